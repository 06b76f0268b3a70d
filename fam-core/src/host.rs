//! What the host shares with every plugin, so that each exists once in the process however
//! many libraries are loaded: the interrupt flag, the thread count and the log subscriber.
//!
//! Every plugin library links its own copy of fam-core, `rayon` and `tracing`, and with them
//! its own statics. A flag or a subscriber set in the host is invisible to those copies
//! unless the host hands it over, which [`HostServices`] does when the plugin registers: the
//! plugin's copy of [`interrupted`] then reads the host's flag, its `tracing` events go to the
//! host's subscriber, and its global thread pool has the host's size. (A pool object itself
//! cannot be shared: rayon finds its worker threads through thread-locals of its own copy.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{FamError, Result};

/// The flag of this copy of fam-core; the host's own copy is the one Ctrl-C sets.
static OWN_FLAG: AtomicBool = AtomicBool::new(false);
/// In a plugin, the host's flag, handed over at registration.
static HOST_FLAG: OnceLock<&'static AtomicBool> = OnceLock::new();

fn flag() -> &'static AtomicBool {
    HOST_FLAG.get().copied().unwrap_or(&OWN_FLAG)
}

/// Asks the run to stop at the next safe point (between batches, before a file is written).
/// `fam-cli` calls this from its Ctrl-C handler.
pub fn request_interrupt() {
    flag().store(true, Ordering::SeqCst);
}

/// `true` once an interrupt was requested: a plugin doing long work (loading a large model,
/// a long forward pass) may check it and stop early with [`FamError::Interrupted`].
pub fn interrupted() -> bool {
    flag().load(Ordering::SeqCst)
}

/// `Err(FamError::Interrupted)` once an interrupt was requested.
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        Err(FamError::Interrupted)
    } else {
        Ok(())
    }
}

/// What the host hands a plugin when it registers.
#[derive(Clone)]
pub struct HostServices {
    /// The host's interrupt flag.
    pub interrupt: &'static AtomicBool,
    /// Threads of the host's pool: the plugin's pool gets as many.
    pub threads: usize,
    /// The host's log subscriber.
    pub log: tracing::Dispatch,
}

impl std::fmt::Debug for HostServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostServices")
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl HostServices {
    /// The services of this process (called by the host, in its own copy of fam-core).
    pub fn of_this_process() -> Self {
        Self {
            interrupt: flag(),
            threads: rayon::current_num_threads(),
            log: tracing::dispatcher::get_default(|d| d.clone()),
        }
    }

    /// Adopts the host's services in the plugin's copies (called on the plugin's side of the
    /// boundary, by [`export_plugin!`](crate::export_plugin)).
    #[doc(hidden)]
    pub fn adopt(&self) {
        if std::ptr::eq(self.interrupt, &OWN_FLAG) {
            return; // the host itself (a statically linked plugin)
        }
        let _ = HOST_FLAG.set(self.interrupt);
        // The first library to build the global pool wins; a plugin's copy of rayon has
        // not built one before it registers.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .thread_name(|i| format!("fam-plugin-{i}"))
            .build_global();
        // A `Dispatch` made here registers with this library's callsites; the host's own
        // `Dispatch` value would not, and every event would be filtered out.
        let _ = tracing::dispatcher::set_global_default(tracing::Dispatch::new(Forward(
            self.log.clone(),
        )));
    }
}

/// A subscriber that hands everything to the host's dispatcher.
struct Forward(tracing::Dispatch);

impl tracing::Subscriber for Forward {
    fn register_callsite(
        &self,
        m: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        self.0.register_callsite(m)
    }
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        self.0.enabled(m)
    }
    fn new_span(&self, a: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        self.0.new_span(a)
    }
    fn record(&self, id: &tracing::span::Id, v: &tracing::span::Record<'_>) {
        self.0.record(id, v)
    }
    fn record_follows_from(&self, id: &tracing::span::Id, follows: &tracing::span::Id) {
        self.0.record_follows_from(id, follows)
    }
    fn event(&self, e: &tracing::Event<'_>) {
        self.0.event(e)
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.0.enter(id)
    }
    fn exit(&self, id: &tracing::span::Id) {
        self.0.exit(id)
    }
    fn clone_span(&self, id: &tracing::span::Id) -> tracing::span::Id {
        self.0.clone_span(id)
    }
    fn try_close(&self, id: tracing::span::Id) -> bool {
        self.0.try_close(id)
    }
}
