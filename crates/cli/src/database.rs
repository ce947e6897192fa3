//! The database settings of `tessera serve` (`TESSERA_DATABASE_*`), applied to every
//! database the process opens: the services open theirs by location only.

use tessera_mesh::config::DatabaseSettings;
use tessera_store::DbOptions;

/// Checks the CA file (readable) and makes the settings the process's database defaults.
/// The error names the setting.
pub fn apply(settings: &DatabaseSettings) -> Result<(), String> {
    if let Some(ca) = &settings.ca_file
        && let Err(err) = std::fs::read(ca)
    {
        return Err(format!("TESSERA_DATABASE_CA: {}: {err}", ca.display()));
    }
    DbOptions::set_process_defaults(DbOptions {
        max_connections: settings.pool_size,
        acquire_timeout: settings.acquire_timeout,
        statement_timeout: settings.statement_timeout,
        ca_file: settings.ca_file.clone(),
        ..DbOptions::default()
    });
    Ok(())
}
