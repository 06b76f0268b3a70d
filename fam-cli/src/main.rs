//! `fam-cli`: run, validate and inspect FAM pipelines. A thin layer over `fam-core`.
//!
//! Exit codes: 0 everything succeeded; 1 the run finished but some items failed;
//! 2 the pipeline could not run (bad file, missing plugin, model error); 130 interrupted
//! (Ctrl-C), with only complete files left behind.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

mod scaffold;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use fam_core::FamError;
use fam_engine::pipeline::LoadedPipeline;
use fam_engine::run::{Progress, RunOptions};
use fam_engine::PluginHost;

#[derive(Parser)]
#[command(
    name = "fam-cli",
    version,
    about = "Explain CNN embedding models with FAM (Feature Activation Maps)"
)]
struct Cli {
    /// More logging (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// Extra folder to search for plugin libraries (repeatable).
    #[arg(long = "plugin-dir", global = true)]
    plugin_dirs: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum PluginsAction {
    /// Write a new plugin crate (a similarity and a renderer to change) from fam's template:
    /// `cargo build --release` in it gives a library `fam-cli --plugin-dir` loads.
    New {
        /// The plugin's name, as pipelines write it (`plugin = "NAME"`).
        name: String,
        /// The crate's folder (default: `fam-plugin-NAME`).
        #[arg(long)]
        path: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline and write its explanations.
    Run {
        pipeline: PathBuf,
        /// Override the pipeline's device: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// Override the pipeline's output folder.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Print the run report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Run only part K of N of the items (pairs, or queries), e.g. for an array job;
        /// writes to `<output>/shard-K-of-N` unless --output is given. `fam-cli merge`
        /// combines the parts.
        #[arg(long, value_parser = fam_engine::pipeline::Shard::parse)]
        shard: Option<fam_engine::pipeline::Shard>,
        /// Continue an interrupted run: images whose forward pass the checkpoint in the
        /// output folder holds are not run through the backbone again.
        #[arg(long)]
        resume: bool,
    },
    /// Embed a retrieval pipeline's gallery into an index that runs search instead
    /// (`task.index`): each `--shard K/N` embeds its part of the gallery once, and parts from
    /// many machines form one index by being put in one folder. `--check DIR` reports parts
    /// that are missing, duplicated or from another model, and files changed since.
    Index {
        /// The retrieval pipeline (its gallery, model and `task.index`).
        #[arg(required_unless_present = "check")]
        pipeline: Option<PathBuf>,
        /// Build only part K of N of the gallery, e.g. for an array job.
        #[arg(long, value_parser = fam_engine::pipeline::Shard::parse)]
        shard: Option<fam_engine::pipeline::Shard>,
        /// Where the parts go (default: the pipeline's `task.index`).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Override the pipeline's device: cpu, cuda or cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// Check the index in DIR instead of building a part (exit code 1 when it is
        /// incomplete or out of date).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["pipeline", "shard", "output", "device"])]
        check: Option<PathBuf>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Combine the output folders of a sharded run (`run --shard K/N`) into one.
    Merge {
        /// The shard folders (any order).
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        /// Where the merged output goes.
        #[arg(long)]
        output: PathBuf,
    },
    /// Check a pipeline without loading any model; reports every problem at once.
    Validate {
        pipeline: PathBuf,
        #[arg(long)]
        device: Option<String>,
    },
    /// List the plugins found, their versions and the kinds they provide; `plugins new NAME`
    /// starts a plugin crate.
    Plugins {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<PluginsAction>,
    },
    /// Write a starter pipeline with comments: pair, retrieval, few_shot or classify.
    Init {
        /// The task: pair, retrieval, few_shot or classify.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(scaffold::TASKS))]
        task: String,
        /// Where to write it.
        #[arg(long, short, default_value = "pipeline.toml")]
        output: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish), e.g.
    /// `fam-cli completions bash > ~/.local/share/bash-completion/completions/fam-cli`.
    Completions { shell: clap_complete::Shell },
    /// Score the faithfulness of the pipeline's maps and of baselines (Average Drop,
    /// Increase in Confidence, deletion and insertion AUC); writes eval.json.
    Eval {
        pipeline: PathBuf,
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        output: Option<PathBuf>,
        /// Deletion / insertion steps.
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Evaluate at most this many (image, reference) items, best rank first.
        #[arg(long, default_value_t = 24)]
        max_items: usize,
        /// Use this similarity kind (of the pipeline's similarity plugin) instead, e.g.
        /// `euclidean`.
        #[arg(long)]
        metric: Option<String>,
        /// For few_shot tasks: explain and score `none` (the similarity to the prototype) or
        /// `others` (its margin over the other classes) instead of the pipeline's setting.
        #[arg(long, value_parser = parse_contrast)]
        contrast: Option<fam_engine::pipeline::Contrast>,
        /// Leave out the occlusion baseline (one forward pass per patch and item).
        #[arg(long)]
        skip_occlusion: bool,
        /// What deletion and insertion replace a pixel with: `blur` (a blurred copy) or
        /// `mean` (the image's mean colour).
        #[arg(long, default_value = "blur", value_parser = fam_engine::eval::Removal::parse)]
        removal: fam_engine::eval::Removal,
        /// The rescaled areas are left out (and counted) for items where removing every
        /// pixel lowers the score by no more than this share of it.
        #[arg(long, default_value_t = 0.05)]
        min_range: f32,
        /// Bootstrap resamples behind each 95% interval.
        #[arg(long, default_value_t = 2000)]
        resamples: usize,
        /// Evaluate only these methods (comma separated; FAM always), e.g.
        /// `sbsm,corrrise`. Known: gradient, activation, decomposition, point-specific,
        /// sbsm, corrrise, occlusion, centre, random, and for few_shot tasks
        /// `fam (contrast=none)` or `fam (contrast=others)`.
        #[arg(long, value_delimiter = ',')]
        methods: Option<Vec<String>>,
        /// Random masks per CorrRISE map (one forward pass each).
        #[arg(long, default_value_t = 500)]
        rise_masks: usize,
        /// Print the report as JSON on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Run nothing: read this saved eval.json, draw its figures again into the output
        /// folder with the pipeline's renderers (the curves; not the maps, which it does not
        /// keep) and print its table.
        #[arg(long, value_name = "EVAL_JSON")]
        replot: Option<PathBuf>,
    },
    /// Time the stages of an explanation per image (decode and preprocess, forward, FAM,
    /// rendering, end to end) for several batch sizes, with the pipeline's models.
    Bench {
        pipeline: PathBuf,
        /// Images to explain (a folder, or files; cycled to --count copies).
        #[arg(long, num_args = 1.., default_value = "data/images")]
        images: Vec<PathBuf>,
        /// How many images each run explains.
        #[arg(long, default_value_t = 32)]
        count: usize,
        /// Batch sizes to time.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        batch_sizes: Vec<usize>,
        /// Timed runs per batch size (after one warm-up run); the median is reported.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long)]
        device: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Convert a PyTorch checkpoint (zip or legacy .pth) to safetensors.
    Convert { input: PathBuf, output: PathBuf },
    /// List the layers of a model one can explain at, with their shapes.
    Layers {
        /// Model file (.onnx, or MobileNetV2 weights)
        model: PathBuf,
        /// Backbone plugin (default: `onnx` for .onnx files, else `retrieval`)
        #[arg(long)]
        plugin: Option<String>,
        /// Backbone kind (default: `onnx` for .onnx files, else `mobilenet_v2`)
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    // Ctrl-C: stop at the next safe point (between batches, before the next file), so the
    // output folder holds only complete files. A second Ctrl-C exits at once.
    let presses = std::sync::atomic::AtomicUsize::new(0);
    let _ = ctrlc::set_handler(move || {
        if presses.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            std::process::exit(130);
        }
        eprintln!("interrupted: stopping after the current step (Ctrl-C again to quit now)");
        fam_engine::run::request_interrupt();
    });
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            let interrupted = e
                .downcast_ref::<FamError>()
                .is_some_and(|f| matches!(f, FamError::Interrupted));
            ExitCode::from(if interrupted { 130 } else { 2 })
        }
    }
}

/// Reads a pipeline, with a plugin host that searches the command line's plugin folders
/// and then the pipeline's own.
fn open_pipeline(
    path: &std::path::Path,
    cli_dirs: &[PathBuf],
) -> anyhow::Result<(LoadedPipeline, PluginHost)> {
    let p = LoadedPipeline::load(path)?;
    let mut dirs = cli_dirs.to_vec();
    dirs.extend(p.pipeline.run.plugin_dirs.iter().cloned());
    let host = PluginHost::new(&dirs);
    Ok((p, host))
}

fn init_logging(verbose: u8, quiet: bool) {
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            pipeline,
            device,
            output,
            json,
            shard,
            resume,
        } => {
            let (p, mut host) = open_pipeline(&pipeline, &cli.plugin_dirs)?;
            let progress = Bars::new(cli.quiet);
            let report = fam_engine::run::run_pipeline(
                &p,
                &mut host,
                &RunOptions {
                    device,
                    output,
                    shard,
                    resume,
                },
                &progress,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                eprintln!(
                    "{} of {} items explained, {} files in {} ({:.0} ms; forward {:.0} ms, FAM {:.1} ms, render {:.0} ms)",
                    report.items_ok,
                    report.items_total,
                    report.files_written,
                    report.output.display(),
                    report.timings_ms.total,
                    report.timings_ms.forward,
                    report.timings_ms.fam,
                    report.timings_ms.render,
                );
                print_failures(&report.failures);
            }
            Ok(items_exit_code(&report.failures))
        }
        Command::Validate { pipeline, device } => {
            let (p, mut host) = open_pipeline(&pipeline, &cli.plugin_dirs)?;
            let problems = p.validate(&mut host, device.as_deref());
            if problems.is_empty() {
                println!("{}: ok", pipeline.display());
                Ok(ExitCode::SUCCESS)
            } else {
                Err(FamError::Validation {
                    path: pipeline,
                    problems,
                }
                .into())
            }
        }
        Command::Plugins {
            action: Some(PluginsAction::New { name, path }),
            ..
        } => {
            let dir = scaffold::new_plugin(&name, path)?;
            println!("{}: plugin `{name}` written. Next:", dir.display());
            println!("  cd {}", dir.display());
            println!("  cargo build --release");
            println!("  fam-cli --plugin-dir target/release plugins");
            println!("  fam-cli --plugin-dir target/release run pipeline.toml");
            Ok(ExitCode::SUCCESS)
        }
        Command::Init {
            task,
            output,
            force,
        } => {
            if output.exists() && !force {
                anyhow::bail!("{} already exists (--force replaces it)", output.display());
            }
            let text = scaffold::starter(&task)?;
            std::fs::write(&output, text).with_context(|| output.display().to_string())?;
            println!(
                "{}: a {task} pipeline; check it with `fam-cli validate {}`",
                output.display(),
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "fam-cli",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins { json, action: None } => {
            let mut host = PluginHost::new(&cli.plugin_dirs);
            let found = host.discover();
            if json {
                let items: Vec<_> = found
                    .iter()
                    .map(|(path, r)| match r {
                        Ok(info) => serde_json::to_value(info).unwrap_or_default(),
                        Err(e) => serde_json::json!({"path": path, "error": e.to_string()}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
                return Ok(ExitCode::SUCCESS);
            }
            if found.is_empty() {
                println!(
                    "no plugins found in: {}",
                    host.search_dirs()
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            for (path, r) in found {
                match r {
                    Ok(info) => {
                        println!("{} {}  ({})", info.name, info.version, path.display());
                        for (what, kinds) in [
                            ("backbone", &info.backbones),
                            ("similarity", &info.similarities),
                            ("renderer", &info.renderers),
                        ] {
                            for (kind, desc) in kinds {
                                println!("  {what:<10} {kind:<14} {desc}");
                            }
                        }
                    }
                    Err(e) => println!("{}: error: {e}", path.display()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Layers {
            model,
            plugin,
            kind,
            json,
        } => {
            let onnx = model.extension().is_some_and(|e| e == "onnx");
            let plugin = plugin.unwrap_or_else(|| if onnx { "onnx" } else { "retrieval" }.into());
            let kind = kind.unwrap_or_else(|| if onnx { "onnx" } else { "mobilenet_v2" }.into());
            let mut host = PluginHost::new(&cli.plugin_dirs);
            host.load(&plugin)?;
            let cfg = fam_core::plugin::BackboneConfig {
                kind: kind.clone(),
                weights: Some(model.clone()),
                ..Default::default()
            };
            let backbone = host
                .backbone(&plugin, &kind)?
                .create(&cfg, &fam_core::candle::Device::Cpu)?;
            let layers = backbone.layers()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&layers)?);
            } else {
                println!(
                    "{} ({plugin}::{kind}), {} layers:",
                    model.display(),
                    layers.len()
                );
                for l in &layers {
                    println!("  {:<24} {:<18} {:?}", l.name, l.op, l.shape);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Index {
            check: Some(dir),
            json,
            ..
        } => {
            let r = fam_engine::index::check(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: {} parts, {} embeddings",
                    r.dir.display(),
                    r.parts,
                    r.rows
                );
                for p in &r.problems {
                    println!("problem: {p}");
                }
                for c in &r.changed {
                    println!("changed: {c}");
                }
                println!(
                    "{}",
                    if r.ok() {
                        "ok: complete, one model, every indexed file unchanged".to_string()
                    } else {
                        format!(
                            "not ok: {} problems, {} changed files",
                            r.problems.len(),
                            r.changed.len()
                        )
                    }
                );
            }
            Ok(if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Index {
            pipeline,
            shard,
            output,
            device,
            json,
            check: None,
        } => {
            let pipeline = pipeline.context("give the pipeline to index, or --check DIR")?;
            let (p, mut host) = open_pipeline(&pipeline, &cli.plugin_dirs)?;
            let progress = Bars::new(cli.quiet);
            let r = fam_engine::index::build_part(
                &p,
                &mut host,
                &RunOptions {
                    device,
                    output,
                    shard,
                    resume: false,
                },
                &progress,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                eprintln!(
                    "part {} of {}: {} of {} gallery images embedded, {} ({:.0} ms; forward {:.0} ms)",
                    r.part,
                    r.parts,
                    r.rows,
                    r.files,
                    r.header.display(),
                    r.timings_ms.total,
                    r.timings_ms.forward
                );
                print_failures(&r.failures);
            }
            Ok(items_exit_code(&r.failures))
        }
        Command::Merge { shards, output } => {
            let mut host = PluginHost::new(&cli.plugin_dirs);
            let r = fam_engine::merge::merge(&output, &shards, &mut host)?;
            eprintln!(
                "{} shards merged: {} of {} items explained, {} files in {}",
                r.shards,
                r.items_ok,
                r.items_total,
                r.files,
                r.output.display()
            );
            Ok(if r.items_ok == r.items_total {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Bench {
            pipeline,
            images,
            count,
            batch_sizes,
            repeat,
            device,
            json,
        } => {
            let (p, mut host) = open_pipeline(&pipeline, &cli.plugin_dirs)?;
            let mut files = Vec::new();
            for i in images {
                if i.is_dir() {
                    files.extend(fam_engine::pipeline::ImageSet::Folder(i).files()?);
                } else {
                    files.push(i);
                }
            }
            let scratch = std::env::temp_dir().join(format!("fam-bench-{}", std::process::id()));
            let opts = fam_engine::bench::BenchOptions {
                run: RunOptions {
                    device,
                    output: None,
                    shard: None,
                    resume: false,
                },
                images: files,
                count,
                batch_sizes,
                repeat,
            };
            let report = fam_engine::bench::run_bench(&p, &mut host, &opts, &scratch);
            let _ = std::fs::remove_dir_all(&scratch);
            let report = report?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", fam_engine::bench::table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            pipeline,
            device,
            output,
            steps,
            max_items,
            metric,
            contrast,
            skip_occlusion,
            removal,
            min_range,
            resamples,
            methods,
            rise_masks,
            json,
            replot,
        } => {
            let (p, mut host) = open_pipeline(&pipeline, &cli.plugin_dirs)?;
            let opts = fam_engine::eval::EvalOptions {
                run: RunOptions {
                    device,
                    output,
                    shard: None,
                    resume: false,
                },
                steps: steps.max(1),
                max_items: max_items.max(1),
                metric,
                contrast,
                skip_occlusion,
                removal,
                min_range,
                resamples: resamples.max(1),
                methods,
                rise_masks: rise_masks.max(2),
            };
            let report = match replot {
                Some(saved) => fam_engine::eval::replot(&p, &mut host, &opts, &saved)?,
                None => fam_engine::eval::run_eval(&p, &mut host, &opts, &Bars::new(cli.quiet))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", fam_engine::eval::table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Convert { input, output } => {
            let sd = fam_weights::load_state_dict(&input)?;
            fam_weights::save_safetensors(&sd, &output)
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "{}: {} tensors written to {}",
                input.display(),
                sd.len(),
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints each failed item, one line each.
fn print_failures(failures: &[fam_engine::run::Failure]) {
    for f in failures {
        eprintln!("failed: {}: {}", f.item, f.error);
    }
}

/// Exit code 0 when every item succeeded, 1 when some failed (listed in the manifest).
fn items_exit_code(failures: &[fam_engine::run::Failure]) -> ExitCode {
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// indicatif progress bars for the run's stages (hidden when stderr is not a terminal).
struct Bars {
    quiet: bool,
    bar: Mutex<Option<indicatif::ProgressBar>>,
}

impl Bars {
    fn new(quiet: bool) -> Self {
        Self {
            quiet,
            bar: Mutex::new(None),
        }
    }
}

impl Progress for Bars {
    fn stage(&self, name: &str, total: u64) {
        if self.quiet {
            return;
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:30}] {pos}/{len} images ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(name.to_string());
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }
    fn advance(&self, n: u64) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            b.inc(n);
        }
    }
    fn finish_stage(&self) {
        if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            b.finish_and_clear();
        }
    }
}

fn parse_contrast(s: &str) -> Result<fam_engine::pipeline::Contrast, String> {
    match s {
        "none" => Ok(fam_engine::pipeline::Contrast::None),
        "others" => Ok(fam_engine::pipeline::Contrast::Others),
        _ => Err(format!("`{s}` is not a contrast (none, others)")),
    }
}
