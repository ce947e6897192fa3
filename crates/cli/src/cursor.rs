//! `tessera cursor`: the operator's view of, and hand on, the event consumers' cursors in a
//! service's database.
//!
//! A consumer halts when its producer's outbox no longer continues its cursor (recreated: a
//! new epoch; restored: it ends below the cursor; pruned past it). Only a person can decide
//! where it should resume, so `reset` is deliberate: it names the service and the producer,
//! and prints what it replaced.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tessera_store::{CursorState, Db};

/// Where the service's database is: `DATABASE_URL` when set, else `<data-dir>/<service>.db`.
#[derive(clap::Args, Debug)]
pub struct DatabaseArgs {
    /// The service whose database holds the cursors: posts, comments or notifications.
    #[arg(long)]
    pub service: String,
    /// Where its SQLite file is (ignored when DATABASE_URL is set).
    #[arg(long, env = "TESSERA_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
}

/// What `tessera cursor` does: show the cursors, or reset one.
#[derive(clap::Subcommand, Debug)]
pub enum CursorCommand {
    /// Print each consumer cursor: position, producer epoch, and why it halted, if it did.
    Show(DatabaseArgs),
    /// Set a consumer's cursor (default 0: replay what the producer keeps) and forget the
    /// producer epoch and the halt; the consumer resumes on its next look (at most 30 s).
    Reset(ResetArgs),
}

/// Which cursor `tessera cursor reset` sets, and to what.
#[derive(clap::Args, Debug)]
pub struct ResetArgs {
    /// The consuming service and where its database is.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The service whose events the cursor follows (e.g. posts for comments).
    #[arg(long)]
    pub producer: String,
    /// The sequence to resume after.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub to: i64,
}

/// A mistake in the command line: exit 64 naming the flag.
#[derive(Debug)]
pub struct UsageError {
    /// The flag at fault, as typed (`--service`).
    pub flag: &'static str,
    /// What is wrong with its value, for the operator.
    pub message: String,
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.flag, self.message)
    }
}

/// The consumer cursors in each service's database, by producer.
fn cursors(service: &str) -> Option<&'static [&'static str]> {
    crate::workloads::find(service)
        .map(|w| w.cursors)
        .filter(|c| !c.is_empty())
}

/// Checks the command line against what exists, before touching any database.
pub fn check(command: &CursorCommand, database_url: Option<&str>) -> Result<(), UsageError> {
    let (database, producer) = match command {
        CursorCommand::Show(database) => (database, None),
        CursorCommand::Reset(reset) => (&reset.database, Some(reset.producer.as_str())),
    };
    let Some(names) = cursors(&database.service) else {
        return Err(UsageError {
            flag: "--service",
            message: format!(
                "{:?} consumes no events; expected posts, comments or notifications",
                database.service
            ),
        });
    };
    if let Some(producer) = producer
        && cursor_of(names, producer).is_none()
    {
        let producers: Vec<&str> = names.iter().filter_map(|n| producer_of(n)).collect();
        return Err(UsageError {
            flag: "--producer",
            message: format!(
                "{} does not consume {producer:?}; it consumes {}",
                database.service,
                producers.join(" and ")
            ),
        });
    }
    if database_url.is_none() {
        let file = sqlite_file(database);
        if !file.is_file() {
            return Err(UsageError {
                flag: "--data-dir",
                message: format!("no database at {}", file.display()),
            });
        }
    }
    Ok(())
}

fn producer_of(cursor: &str) -> Option<&str> {
    cursor.strip_suffix("-events")
}

fn cursor_of(names: &[&'static str], producer: &str) -> Option<&'static str> {
    names
        .iter()
        .copied()
        .find(|n| producer_of(n) == Some(producer))
}

fn sqlite_file(database: &DatabaseArgs) -> PathBuf {
    database.data_dir.join(format!("{}.db", database.service))
}

async fn open(database: &DatabaseArgs, database_url: Option<&str>) -> anyhow::Result<Db> {
    let target = match database_url {
        Some(url) => url.to_owned(),
        None => path_str(&sqlite_file(database))?,
    };
    // No service migrations: only the store's own tables, which the service has already.
    Db::open(&target, &[])
        .await
        .with_context(|| format!("opening the {} database", database.service))
}

fn path_str(path: &Path) -> anyhow::Result<String> {
    path.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn describe(state: &CursorState) -> String {
    format!(
        "{} at {} (epoch {}{})",
        state.name,
        state.position,
        state.epoch.as_deref().unwrap_or("not yet seen"),
        state
            .halted
            .as_deref()
            .map(|h| format!("; HALTED: {h}"))
            .unwrap_or_default()
    )
}

/// Runs a checked command; what it did goes to stdout.
pub async fn run(command: CursorCommand, database_url: Option<&str>) -> anyhow::Result<()> {
    match command {
        CursorCommand::Show(database) => {
            let db = open(&database, database_url).await?;
            let states = db.cursor_states().await?;
            if states.is_empty() {
                println!("{}: no consumer has run yet", database.service);
            }
            for state in states {
                println!("{}: {}", database.service, describe(&state));
            }
            db.close().await;
        }
        CursorCommand::Reset(reset) => {
            let names = cursors(&reset.database.service).unwrap_or_default();
            let name = cursor_of(names, &reset.producer)
                .with_context(|| format!("--producer {}", reset.producer))?;
            let db = open(&reset.database, database_url).await?;
            let before = db.reset_cursor(name, reset.to).await?;
            println!(
                "{}: reset {} to {}; it was {}",
                reset.database.service,
                name,
                reset.to,
                describe(&before)
            );
            db.close().await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cursor_names_its_producer() {
        for service in crate::workloads::names() {
            for name in cursors(service).unwrap_or_default() {
                let producer = producer_of(name).unwrap_or_default();
                assert!(
                    crate::workloads::upstreams(service).any(|u| u == producer),
                    "{service}: {name}"
                );
            }
        }
    }
}
