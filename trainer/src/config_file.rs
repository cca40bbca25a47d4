//! `--config FILE.toml` on a subcommand: the file's keys (its long option names, with `-` or
//! `_`) become options placed before the command line's own, so the command line overrides the
//! file. Unknown keys and unsupported values are errors naming the file, the line and the key.

use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("--config needs a file")]
    MissingPath,
    #[error("reading config {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config {}:{line}: {msg}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        msg: String,
    },
}

/// `argv` with the options of the `--config` file (if any) spliced in after the subcommand
/// (`argv[1]`), as `cli` defines its options.
pub fn with_config(
    cli: &clap::Command,
    argv: Vec<OsString>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(i) = argv
        .iter()
        .position(|a| a == "--config" || a.to_string_lossy().starts_with("--config="))
    else {
        return Ok(argv);
    };
    let path = match argv[i].to_string_lossy().strip_prefix("--config=") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(argv.get(i + 1).ok_or(ConfigFileError::MissingPath)?),
    };
    let name = argv
        .get(1)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(sub) = cli.find_subcommand(&name) else {
        return Ok(argv);
    };
    let longs: Vec<&str> = sub.get_arguments().filter_map(|a| a.get_long()).collect();
    let text = std::fs::read_to_string(&path).map_err(|error| ConfigFileError::Read {
        path: path.clone(),
        error,
    })?;
    let err = |line: usize, msg: String| ConfigFileError::Parse {
        path: path.clone(),
        line,
        msg,
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(1, |s| line_of(&text, s.start));
        err(line, e.message().trim_end().to_string())
    })?;
    let on_cli = |key: &str| {
        argv.iter().any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{key}") || a.starts_with(&format!("--{key}="))
        })
    };
    let mut extra: Vec<OsString> = Vec::new();
    for (k, v) in &table {
        let key = k.replace('_', "-");
        let line = key_line(&text, k);
        if key == "config" || !longs.contains(&key.as_str()) {
            return Err(err(
                line,
                format!("`{k}` is not an option of `bft {name}` (see bft {name} --help)"),
            ));
        }
        if on_cli(&key) {
            continue;
        }
        let value = match v {
            toml::Value::Boolean(true) => {
                extra.push(format!("--{key}").into());
                continue;
            }
            toml::Value::Boolean(false) => continue,
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Array(items) => items
                .iter()
                .map(|x| match x {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => {
                return Err(err(
                    line,
                    format!("`{k}` = {other} is not a string, number, boolean or list"),
                ));
            }
        };
        // `--key=value`, so a value that starts with `-` stays a value.
        let mut arg = OsString::from(format!("--{key}="));
        arg.push(value);
        extra.push(arg);
    }
    let mut out = argv[..2].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

/// The 1-based line of byte offset `at`.
/// The 1-based line of byte `at` in `text`.
pub(crate) fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The line on which top-level key `key` is set, as `key = ...` or as a `[key]` table (1 when
/// it cannot be found, e.g. a quoted key).
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let assigned = l
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='));
            let table = l
                .trim_start_matches('[')
                .strip_prefix(key)
                .is_some_and(|rest| rest.starts_with([']', '.']));
            assigned || (l.starts_with('[') && table)
        })
        .map_or(1, |i| i + 1)
}
