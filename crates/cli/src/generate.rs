//! `kairos completions` and `kairos man`: shell completion scripts (clap_complete) and man
//! pages (clap_mangen) generated from the clap definition itself, so they never drift from
//! `--help`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The shells `kairos completions` writes a script for.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl CompletionShell {
    fn generator(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

/// The manual the pages belong to (the centre of their footer).
const MANUAL: &str = "Kairos Manual";

/// The pages' date: `SOURCE_DATE_EPOCH`'s day when set (reproducible builds), else today's
/// (UTC). clap_mangen leaves the date empty otherwise, and an empty field shifts the
/// footer's source and manual by one.
fn page_date() -> String {
    let now = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|seconds| seconds.trim().parse::<i64>().ok())
        .and_then(|seconds| time::OffsetDateTime::from_unix_timestamp(seconds).ok())
        .unwrap_or_else(time::OffsetDateTime::now_utc);
    let date = now.date();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

fn page(command: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(command)
        .manual(MANUAL)
        .date(page_date())
}

/// Writes `shell`'s completion script for `command` (named `kairos`) to `out`.
pub fn completions(mut command: clap::Command, shell: CompletionShell, out: &mut dyn Write) {
    clap_complete::generate(shell.generator(), &mut command, "kairos", out);
}

/// The top page, `kairos.1`, to `out`.
pub fn man_page(command: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    page(command.disable_help_subcommand(true)).render(out)
}

/// One page per command and subcommand into `dir` (made if missing): `kairos.1`,
/// `kairos-capture.1`, `kairos-replica-add.1`, ... Returns the files written, parents
/// first.
pub fn man_pages(command: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("making the man page directory {}", dir.display()))?;
    // Built once, the subcommands carry their full names (`kairos-replica-add`) and the
    // global options; `help` is clap's, not a command of ours.
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    write_pages(&command, dir, &mut written)?;
    Ok(written)
}

fn write_pages(command: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    let page = page(command.clone());
    let path = dir.join(page.get_filename());
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("writing {}", path.display()))?,
    );
    page.render(&mut file)
        .and_then(|()| file.flush())
        .with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for subcommand in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_pages(subcommand, dir, written)?;
    }
    Ok(())
}
