//! The commands the README and docs/ show must work as written. Every command line in a fenced
//! `sh` block of README.md or docs/*.md that runs `cargo xtask`, `swarmtrain-relay` or
//! `swarmtrain-peer` is checked: an xtask command and benchmark must exist, and the relay's and
//! the peer's command lines must parse with the binaries' own clap definitions (the line is run
//! with `--help` appended: clap rejects an unknown subcommand, flag or malformed value before it
//! gets to the help).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Result;
use crate::utils::root;

/// One command line of a document: where it is, and its words (quotes removed).
#[derive(Debug, PartialEq)]
pub(crate) struct Line {
    pub at: String,
    pub words: Vec<String>,
}

/// The command lines of the fenced `sh` blocks of `text`, continuation lines joined and
/// environment assignments (`NAME=value cmd`) dropped.
pub(crate) fn command_lines(file: &str, text: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    let mut pending: Option<(usize, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && matches!(trimmed, "```sh" | "```bash" | "```shell");
            continue;
        }
        if !in_sh {
            continue;
        }
        // A trailing comment is not part of the command.
        let code = match trimmed.find(" #") {
            Some(i) => trimmed[..i].trim_end(),
            None if trimmed.starts_with('#') => "",
            None => trimmed,
        };
        let (start, mut joined) = pending.take().unwrap_or((n + 1, String::new()));
        if let Some(body) = code.strip_suffix('\\') {
            joined.push_str(body);
            joined.push(' ');
            pending = Some((start, joined));
            continue;
        }
        joined.push_str(code);
        let words: Vec<String> = split_words(&joined)
            .into_iter()
            .skip_while(|w| w.contains('=') && !w.starts_with('-'))
            .collect();
        if !words.is_empty() {
            lines.push(Line {
                at: format!("{file}:{start}"),
                words,
            });
        }
    }
    lines
}

/// Splits a shell line into words, honouring single and double quotes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut started = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, c) if c.is_whitespace() => {
                if started || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            (None, c) => word.push(c),
        }
    }
    if started || !word.is_empty() {
        words.push(word);
    }
    words
}

/// What a command line runs, when it is ours: the binary and its arguments.
fn ours(words: &[String]) -> Option<(&'static str, &[String])> {
    let first = words.first()?.as_str();
    let name = first.rsplit('/').next()?;
    match name {
        "swarmtrain-relay" => Some(("swarmtrain-relay", &words[1..])),
        "swarmtrain-peer" => Some(("swarmtrain-peer", &words[1..])),
        "cargo" if words.get(1).is_some_and(|w| w == "run") => {
            let bin = words.windows(2).find(|w| w[0] == "--bin")?[1].as_str();
            let rest = words.iter().position(|w| w == "--")? + 1;
            match bin {
                "swarmtrain-relay" => Some(("swarmtrain-relay", &words[rest..])),
                "swarmtrain-peer" => Some(("swarmtrain-peer", &words[rest..])),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Checks every command line of README.md and docs/*.md; `bins` holds the built
/// `swarmtrain-relay` and `swarmtrain-peer`.
pub(crate) fn check(bins: &Path) -> Result {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root().join("docs"))
        .map_err(|e| format!("docs/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in files {
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = path
            .strip_prefix(root())
            .unwrap_or(&path)
            .display()
            .to_string();
        for line in command_lines(&file, &text) {
            let problem =
                if line.words.len() >= 2 && line.words[0] == "cargo" && line.words[1] == "xtask" {
                    xtask_problem(&line.words[2..])
                } else if let Some((bin, args)) = ours(&line.words) {
                    parse_problem(&bins.join(bin), args)
                } else {
                    continue;
                };
            checked += 1;
            if let Some(problem) = problem {
                failures.push(format!(
                    "{}: `{}`: {problem}",
                    line.at,
                    line.words.join(" ")
                ));
            }
        }
    }
    // README's table of xtask commands lists every one `cargo xtask` runs.
    let readme = fs::read_to_string(root().join("README.md")).map_err(|e| e.to_string())?;
    failures.extend(unlisted(&readme));
    eprintln!("xtask: {checked} commands in README.md and docs/ checked");
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "commands in the docs that do not work as written:\n{}",
            failures.join("\n")
        ))
    }
}

/// The xtask commands and benchmarks `readme` does not mention as `` `cargo xtask NAME ``.
fn unlisted(readme: &str) -> Vec<String> {
    let tasks = crate::TASKS
        .iter()
        .filter(|t| t.name != "bench")
        .map(|t| t.name.to_owned());
    let benches = crate::commands::bench::BENCHES
        .iter()
        .map(|b| format!("bench {}", b.name));
    tasks
        .chain(benches)
        .filter(|name| !readme.contains(&format!("`cargo xtask {name}")))
        .map(|name| format!("README.md does not list `cargo xtask {name}`"))
        .collect()
}

/// Why `cargo xtask ARGS` would not run, if it would not.
pub(crate) fn xtask_problem(args: &[String]) -> Option<String> {
    let name = args.first().map(String::as_str).unwrap_or_default();
    if !crate::TASKS.iter().any(|t| t.name == name) {
        return Some(format!("there is no `cargo xtask {name}`"));
    }
    if name == "bench" {
        let bench = args.get(1).map(String::as_str).unwrap_or_default();
        if !crate::commands::bench::BENCHES
            .iter()
            .any(|b| b.name == bench)
        {
            return Some(format!("there is no `cargo xtask bench {bench}`"));
        }
    }
    None
}

/// Why `bin ARGS` does not parse, if it does not.
fn parse_problem(bin: &Path, args: &[String]) -> Option<String> {
    let out = match Command::new(bin).args(args).arg("--help").output() {
        Ok(out) => out,
        Err(e) => return Some(format!("{}: {e}", bin.display())),
    };
    (!out.status.success()).then(|| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &Line) -> Vec<&str> {
        line.words.iter().map(String::as_str).collect()
    }

    #[test]
    fn command_lines_come_from_sh_blocks_joined_and_unquoted() {
        let text = "text `cargo xtask nope` in prose\n\
                    ```sh\n\
                    cargo xtask run    # builds\n\
                    SWARMTRAIN_TURN_SECRET=\"$S\" swarmtrain-relay serve --http 0.0.0.0:443 \\\n  \
                      --ice-server 'turn:h:3478?transport=udp'\n\
                    ```\n\
                    ```toml\nhttp = \"x\"\n```\n";
        let lines = command_lines("README.md", text);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(words(&lines[0]), ["cargo", "xtask", "run"]);
        assert_eq!(lines[0].at, "README.md:3");
        assert_eq!(
            words(&lines[1]),
            [
                "swarmtrain-relay",
                "serve",
                "--http",
                "0.0.0.0:443",
                "--ice-server",
                "turn:h:3478?transport=udp"
            ]
        );
    }

    #[test]
    fn xtask_commands_and_benches_must_exist() {
        let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(xtask_problem(&args("bench browser")), None);
        assert_eq!(xtask_problem(&args("run --http 127.0.0.1:9000")), None);
        assert!(xtask_problem(&args("bench nope")).is_some());
        assert!(xtask_problem(&args("volunteer")).is_some());
    }

    #[test]
    fn cargo_run_lines_name_the_binary_and_its_arguments() {
        let words: Vec<String> =
            "cargo run -p swarmtrain-client --bin swarmtrain-peer -- train --run lm"
                .split(' ')
                .map(str::to_owned)
                .collect();
        let (bin, args) = ours(&words).expect("ours");
        assert_eq!(
            (bin, args.join(" ").as_str()),
            ("swarmtrain-peer", "train --run lm")
        );
    }

    #[test]
    fn the_readme_must_list_every_xtask_command() {
        let all: String = crate::TASKS
            .iter()
            .map(|t| format!("`cargo xtask {}` ", t.name))
            .chain(
                crate::commands::bench::BENCHES
                    .iter()
                    .map(|b| format!("`cargo xtask bench {}` ", b.name)),
            )
            .collect();
        assert_eq!(unlisted(&all), Vec::<String>::new());
        let missing = unlisted(&all.replace("`cargo xtask bench soak`", ""));
        assert_eq!(
            missing,
            ["README.md does not list `cargo xtask bench soak`"]
        );
    }

    #[test]
    fn usage_lists_every_command_and_benchmark() {
        let usage = crate::usage();
        for task in crate::TASKS {
            assert!(usage.contains(&format!("  {}", task.name)), "{}", task.name);
        }
        for bench in crate::commands::bench::BENCHES {
            assert!(
                usage.contains(&format!("bench {}", bench.name)),
                "{}",
                bench.name
            );
        }
    }
}
