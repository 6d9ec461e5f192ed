//! The command line: `serve` and `migrate` run the service; `keys`,
//! `operators`, `peppers`, `audit` and `verify` are thin gRPC clients for people
//! without grpcurl. Tokens come from the environment or a file, never from
//! argv (where `ps` would show them).

pub mod client;
mod render;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "keywarden", version, about = "gRPC verification of scoped merchant API keys")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve KeyAdmin and KeyVerify over gRPC.
    Serve {
        /// TOML settings file; KEYWARDEN_* variables override it.
        #[arg(long, env = "KEYWARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(long, env = "KEYWARDEN_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage a merchant's API keys.
    Keys {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage operator credentials (KeyAdmin tokens with a role); ADMIN only.
    Operators {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: OperatorsCommand,
    },
    /// Pepper generations and what still needs each; ADMIN only.
    Peppers {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: PeppersCommand,
    },
    /// Read a merchant's audit trail.
    Audit {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Verify a key as an internal service would.
    Verify {
        #[command(flatten)]
        conn: Connection,
        /// The API key; `-` reads it from standard input (keeps it out of `ps`).
        #[arg(long)]
        api_key: String,
        #[arg(long, default_value = "")]
        ip: String,
        /// Scope the request needs; empty authenticates only.
        #[arg(long, default_value = "")]
        scope: String,
        #[arg(long, default_value = "")]
        endpoint: String,
        #[arg(long, default_value = "")]
        method: String,
        /// Credits the call takes from a key with credits (0 means 1).
        #[arg(long, default_value_t = 0)]
        cost: u32,
    },
}

/// How to reach the server.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Server address.
    #[arg(long, env = "KEYWARDEN_SERVER", default_value = "http://127.0.0.1:50051", global = true)]
    pub server: String,
    /// File holding the KeyAdmin token. Without it: KEYWARDEN_TOKEN (an
    /// operator token), else KEYWARDEN_ADMIN_TOKEN (bootstrap), else
    /// `<data dir>/admin-token`. There is no flag for the token itself.
    #[arg(long, env = "KEYWARDEN_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM CA that the server's certificate must chain to; turns on TLS.
    #[arg(long, env = "KEYWARDEN_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for mTLS (with --key).
    #[arg(long, env = "KEYWARDEN_CLIENT_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "KEYWARDEN_CLIENT_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Where an embedded first run put its generated admin token.
    #[arg(long, env = "KEYWARDEN_DATA_DIR", default_value = "keywarden-data", global = true)]
    pub data_dir: PathBuf,
    /// Print JSON (one document per command) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its plaintext is printed once.
    Create {
        #[arg(long)]
        merchant: String,
        #[arg(long)]
        name: String,
        /// A scope to grant (repeat for several).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// A preset instead of scopes, e.g. openclaw_skill.
        #[arg(long, default_value = "")]
        preset: String,
        /// RFC 3339 time, e.g. 2027-06-30T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// An IP or CIDR range the key may be used from (repeat for several).
        #[arg(long = "allow")]
        allowed: Vec<String>,
        /// A rate limit NAME=LIMIT/WINDOW, e.g. per-minute=100/60s (repeat
        /// for several; windows in ms, s, m, h or d).
        #[arg(long = "rate-limit")]
        rate_limits: Vec<String>,
        /// A balance of credits (each Verify takes its cost); unset is
        /// unlimited.
        #[arg(long)]
        credits: Option<i64>,
        /// Refill the credits to AMOUNT/daily or AMOUNT/monthly (UTC).
        #[arg(long, requires = "credits")]
        refill: Option<String>,
        /// A metadata entry NAME=VALUE, returned on every Verify (repeat for
        /// several).
        #[arg(long = "meta")]
        metadata: Vec<String>,
    },
    /// List keys, newest first.
    List {
        #[arg(long)]
        merchant: String,
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
        #[arg(long)]
        include_revoked: bool,
    },
    Get {
        #[arg(long)]
        merchant: String,
        key_id: String,
    },
    /// Change name, scopes, IP limits, expiry, rate limits, credits or
    /// metadata; only what is given changes.
    Update {
        #[arg(long)]
        merchant: String,
        key_id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long = "allow")]
        allowed: Vec<String>,
        /// Remove every IP limit.
        #[arg(long, conflicts_with = "allowed")]
        allow_any_ip: bool,
        #[arg(long)]
        expires_at: Option<String>,
        /// Remove the expiry.
        #[arg(long, conflicts_with = "expires_at")]
        no_expiry: bool,
        /// Replace the key's rate limits (NAME=LIMIT/WINDOW, repeat).
        #[arg(long = "rate-limit")]
        rate_limits: Vec<String>,
        /// Remove every rate limit.
        #[arg(long, conflicts_with = "rate_limits")]
        no_rate_limits: bool,
        /// Replace the key's credits with this balance.
        #[arg(long)]
        credits: Option<i64>,
        /// With --credits: refill to AMOUNT/daily or AMOUNT/monthly.
        #[arg(long, requires = "credits")]
        refill: Option<String>,
        /// Remove the key's credits (unlimited).
        #[arg(long, conflicts_with = "credits")]
        no_credits: bool,
        /// Replace the key's metadata (NAME=VALUE, repeat).
        #[arg(long = "meta")]
        metadata: Vec<String>,
        /// Remove every metadata entry.
        #[arg(long, conflicts_with = "metadata")]
        no_metadata: bool,
    },
    /// Stop a key verifying until it is enabled again, on every replica.
    Disable {
        #[arg(long)]
        merchant: String,
        key_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let a disabled key verify again.
    Enable {
        #[arg(long)]
        merchant: String,
        key_id: String,
    },
    /// Report leaked keys or operator tokens, read one per line from stdin
    /// (never from the command line): each one proven is revoked at once.
    ReportLeaked {
        /// Who found them, e.g. support or a scanner's name.
        #[arg(long, default_value = "")]
        source: String,
        /// Where they were found.
        #[arg(long, default_value = "")]
        url: String,
    },
    /// Revoke a key, immediately.
    Revoke {
        #[arg(long)]
        merchant: String,
        key_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Issue a successor and revoke the key (after a grace period, if given).
    Regenerate {
        #[arg(long)]
        merchant: String,
        key_id: String,
        /// e.g. 30m, 24h, 7d (at most 7 days).
        #[arg(long)]
        grace: Option<String>,
    },
    /// Last use and request counts.
    Usage {
        #[arg(long)]
        merchant: String,
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperatorsCommand {
    /// Issue a token; its plaintext is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// admin, key-manager, auditor or leak-reporter.
        #[arg(long)]
        role: String,
        /// Limit the token to a merchant (repeat for several); not for admin.
        #[arg(long = "merchant")]
        merchants: Vec<String>,
        /// RFC 3339 time, e.g. 2027-06-30T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Tokens, newest first, revoked ones included.
    List {
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Revoke a token, on every replica at once.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum PeppersCommand {
    /// How many live keys and operator tokens remain on each generation;
    /// a generation that is not current and has none may be retired.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Audit events, newest first.
    List {
        /// The merchant whose events to list.
        #[arg(long, required_unless_present = "unattributed", default_value = "")]
        merchant: String,
        /// Instead, the events of no merchant: rollups of malformed,
        /// unknown and throttled Verify calls, failed authentications,
        /// operator tokens (ADMIN only).
        #[arg(long, conflicts_with = "merchant")]
        unattributed: bool,
        /// Only this key's events.
        #[arg(long = "key-id", default_value = "")]
        key_id: String,
        /// RFC 3339, inclusive.
        #[arg(long)]
        since: Option<String>,
        /// RFC 3339, exclusive.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
