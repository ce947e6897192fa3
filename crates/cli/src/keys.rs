//! The users service's key-encryption key (which seals the token signing keys at rest) and
//! `tessera keys rotate`, which makes a new signing key on demand.
//!
//! Why a command rather than an admin RPC: rotating on demand is what an operator does when
//! a key may have leaked, possibly while the service is unhealthy; the command needs exactly
//! what can already read the keys (the database and the key-encryption key), and adds no
//! method that a stolen operator certificate could call over the network. Running replicas
//! publish the new key at their next key check (at most 5 s) and sign with it 10 s after
//! it was made; verifiers in other services
//! fetch it when they first meet its key id.

use std::path::PathBuf;

use anyhow::Context;
use tessera_mesh::config::Settings;
use tessera_users::Kek;

/// The setting named in errors.
const SETTING: &str = "TESSERA_KEY_ENCRYPTION_KEY_FILE";

/// The key-encryption key for `settings` (the users service): the file named by
/// `TESSERA_KEY_ENCRYPTION_KEY_FILE` (a mounted Secret); without it, on SQLite, the data
/// directory's generated `key-encryption.key` (0600). PostgreSQL without the file is refused:
/// replicas would each make their own key and could not read each other's signing keys.
pub fn key_encryption_key(settings: &Settings) -> anyhow::Result<Kek> {
    if let Some(path) = &settings.tokens.key_encryption_key_file {
        return Kek::load(path).with_context(|| SETTING.to_owned());
    }
    if settings.database_url.is_some() {
        anyhow::bail!(
            "{SETTING}: required with DATABASE_URL (mount a Secret with 32 random bytes, e.g. `openssl rand -base64 32`)"
        );
    }
    tessera_mesh::private::secure_dir(&settings.data_dir).with_context(|| {
        format!(
            "TESSERA_DATA_DIR: cannot create {}",
            settings.data_dir.display()
        )
    })?;
    let path = settings.data_dir.join(tessera_users::keys::DATA_DIR_KEK);
    Kek::load_or_create(&path).with_context(|| format!("{SETTING} (unset, so {})", path.display()))
}

/// `tessera up`: the data directory's key-encryption key file, created (0600) if missing, so
/// the mesh's users service has one whatever its database (SQLite or `DATABASE_URL`).
pub fn data_dir_key_file(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join(tessera_users::keys::DATA_DIR_KEK);
    Kek::load_or_create(&path)
        .with_context(|| format!("{SETTING} (unset, so {})", path.display()))?;
    Ok(path)
}

/// `tessera keys`: maintenance of the users service's token signing keys.
#[derive(clap::Args)]
pub struct KeysArgs {
    /// The one action to take.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// What `tessera keys` can do.
#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a new token signing key now; older keys keep verifying until their tokens expire.
    /// Uses DATABASE_URL and TESSERA_KEY_ENCRYPTION_KEY_FILE like `tessera serve users`.
    Rotate {
        /// The users service's data directory (its users.db) when DATABASE_URL is unset.
        #[arg(long, default_value = ".tessera")]
        data_dir: PathBuf,
    },
}

/// Settings of the users service as `serve users` would read them, with `data_dir`.
pub fn users_settings(
    data_dir: &std::path::Path,
) -> Result<Settings, tessera_mesh::config::ConfigError> {
    let data_dir = data_dir.display().to_string();
    let lookup = |key: &str| {
        if key == "TESSERA_DATA_DIR" {
            Some(data_dir.clone())
        } else {
            std::env::var(key).ok()
        }
    };
    Settings::from_lookup("users", &lookup)
}

/// `tessera keys rotate`: returns the new key id.
pub async fn rotate(settings: &Settings) -> anyhow::Result<String> {
    let target = match &settings.database_url {
        Some(url) => url.clone(),
        None => {
            let path = settings.data_dir.join("users.db");
            anyhow::ensure!(
                path.exists(),
                "TESSERA_DATA_DIR: no users database at {} (run `tessera up` first, or set DATABASE_URL)",
                path.display()
            );
            path.display().to_string()
        }
    };
    let kek = key_encryption_key(settings)?;
    let db = tessera_store::Db::open(&target, tessera_users::MIGRATIONS)
        .await
        .context("opening the users database")?;
    let kid = tessera_users::rotate_now(&db, &kek).await?;
    db.close().await;
    Ok(kid)
}
