//! The client commands: one gRPC call each, printed as a table or as JSON.

use std::io::Read as _;

use anyhow::{Context as _, bail};
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use super::{AuditCommand, Connection, KeysCommand, OperatorsCommand, PeppersCommand, render};
use crate::api::pb::{self, key_admin_client::KeyAdminClient, key_verify_client::KeyVerifyClient};

fn read(what: &str, path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

async fn channel(conn: &Connection) -> anyhow::Result<Channel> {
    let mut server = conn.server.clone();
    if conn.ca_cert.is_some() && server.starts_with("http://") {
        server = server.replacen("http://", "https://", 1);
    }
    let mut endpoint = Channel::from_shared(server.clone()).context("--server is not a URL")?;
    if server.starts_with("https://") {
        let Some(ca) = &conn.ca_cert else {
            bail!("--server is https: give --ca-cert, the PEM CA its certificate chains to");
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("--ca-cert", ca)?));
        if let (Some(cert), Some(key)) = (&conn.cert, &conn.key) {
            tls = tls.identity(Identity::from_pem(read("--cert", cert)?, read("--key", key)?));
        }
        endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
    }
    endpoint.connect().await.with_context(|| format!("cannot reach keywarden at {server}"))
}

/// The KeyAdmin token: a file, else the environment, else the one an
/// embedded first run generated into the data directory. Never argv.
fn token(conn: &Connection) -> anyhow::Result<String> {
    if let Some(path) = &conn.token_file {
        let token = String::from_utf8(read("--token-file", path)?).context("the token file is not text")?;
        return Ok(token.trim().to_owned());
    }
    for variable in ["KEYWARDEN_TOKEN", "KEYWARDEN_ADMIN_TOKEN"] {
        if let Ok(token) = std::env::var(variable)
            && !token.trim().is_empty()
        {
            return Ok(token.trim().to_owned());
        }
    }
    let path = conn.data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(token) => Ok(token.trim().to_owned()),
        Err(_) => bail!(
            "no token: give --token-file, or set KEYWARDEN_TOKEN or KEYWARDEN_ADMIN_TOKEN (none found at {})",
            path.display()
        ),
    }
}

fn authorized<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .context("the admin token contains characters not allowed in a header")?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn timestamp(field: &str, value: Option<&str>) -> anyhow::Result<Option<prost_types::Timestamp>> {
    value
        .map(|v| {
            let t = chrono::DateTime::parse_from_rfc3339(v).with_context(|| {
                format!("{field}: {v:?} is not an RFC 3339 time such as 2027-06-30T00:00:00Z")
            })?;
            Ok(crate::api::convert::timestamp(t.with_timezone(&chrono::Utc)))
        })
        .transpose()
}

/// `90s`, `30m`, `24h`, `7d`.
pub fn duration(value: &str) -> anyhow::Result<prost_types::Duration> {
    let (number, unit) = value.split_at(value.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: i64 =
        number.parse().with_context(|| format!("{value:?} is not a duration such as 30m, 24h or 7d"))?;
    let seconds = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => bail!("unknown duration unit {other:?}; use s, m, h or d"),
    };
    Ok(prost_types::Duration { seconds, nanos: 0 })
}

/// `NAME=LIMIT/WINDOW`, the window a number with ms, s, m, h or d. The
/// server checks the values; this only reads the shape.
/// `--credits N [--refill AMOUNT/daily|monthly]`.
fn credits_of(remaining: Option<i64>, refill: Option<&str>) -> anyhow::Result<Option<pb::Credits>> {
    let Some(remaining) = remaining else { return Ok(None) };
    let refill = match refill {
        None => None,
        Some(spec) => {
            let shape = || anyhow::anyhow!("--refill {spec:?}: expected AMOUNT/daily or AMOUNT/monthly");
            let (amount, interval) = spec.split_once('/').ok_or_else(shape)?;
            let interval = match interval {
                "daily" => pb::RefillInterval::Daily,
                "monthly" => pb::RefillInterval::Monthly,
                _ => return Err(shape()),
            };
            Some(pb::Refill { amount: amount.parse().map_err(|_| shape())?, interval: interval.into() })
        }
    };
    Ok(Some(pb::Credits { remaining, refill }))
}

fn rate_limit(spec: &str) -> anyhow::Result<pb::RateLimit> {
    let shape =
        || anyhow::anyhow!("--rate-limit {spec:?}: expected NAME=LIMIT/WINDOW, e.g. per-minute=100/60s");
    let (name, rest) = spec.split_once('=').ok_or_else(shape)?;
    let (limit, window) = rest.split_once('/').ok_or_else(shape)?;
    let digits = window.find(|c: char| !c.is_ascii_digit()).ok_or_else(shape)?;
    let (amount, unit) = window.split_at(digits);
    let amount: u64 = amount.parse().map_err(|_| shape())?;
    let ms_per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(shape()),
    };
    let ms = amount.checked_mul(ms_per).ok_or_else(shape)?;
    Ok(pb::RateLimit {
        name: name.to_owned(),
        limit: limit.parse().map_err(|_| shape())?,
        window: Some(prost_types::Duration {
            seconds: i64::try_from(ms / 1_000).map_err(|_| shape())?,
            nanos: i32::try_from(ms % 1_000).map_err(|_| shape())? * 1_000_000,
        }),
    })
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    use tonic_types::StatusExt;
    let mut message = format!("{:?}: {}", e.code(), e.message());
    if let Some(bad) = e.get_details_bad_request() {
        // The message already quotes the first violation; each field is
        // said once.
        for v in bad.field_violations {
            let line = format!("{}: {}", v.field, v.description);
            if !e.message().contains(&line) {
                message.push_str(&format!("\n  {line}"));
            }
        }
    }
    anyhow::anyhow!(message)
}

pub async fn keys(conn: Connection, command: KeysCommand) -> anyhow::Result<()> {
    let token = token(&conn)?;
    let mut admin = KeyAdminClient::new(channel(&conn).await?);
    match command {
        KeysCommand::Create {
            merchant,
            name,
            scopes,
            preset,
            expires_at,
            allowed,
            rate_limits,
            credits,
            refill,
            metadata,
        } => {
            let request = pb::CreateKeyRequest {
                merchant_id: merchant,
                name,
                scopes,
                preset,
                expires_at: timestamp("--expires-at", expires_at.as_deref())?,
                allowed_cidrs: allowed,
                rate_limits: rate_limits.iter().map(|s| rate_limit(s)).collect::<anyhow::Result<_>>()?,
                credits: credits_of(credits, refill.as_deref())?,
                metadata: metadata_of(&metadata)?,
            };
            let created =
                admin.create_key(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::issued(conn.json, created.api_key.as_ref(), &created.plaintext_key, None);
        }
        KeysCommand::List { merchant, page_size, page_token, include_revoked } => {
            let request =
                pb::ListKeysRequest { merchant_id: merchant, page_size, page_token, include_revoked };
            let page =
                admin.list_keys(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::key_list(conn.json, &page.api_keys, &page.next_page_token);
        }
        KeysCommand::Get { merchant, key_id } => {
            let request = pb::GetKeyRequest { merchant_id: merchant, key_id };
            let key = admin.get_key(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::key(conn.json, key.api_key.as_ref());
        }
        KeysCommand::Update {
            merchant,
            key_id,
            name,
            scopes,
            allowed,
            allow_any_ip,
            expires_at,
            no_expiry,
            rate_limits,
            no_rate_limits,
            credits,
            refill,
            no_credits,
            metadata,
            no_metadata,
        } => {
            let mut paths = Vec::new();
            if name.is_some() {
                paths.push("name".to_owned());
            }
            if !scopes.is_empty() {
                paths.push("scopes".to_owned());
            }
            if !allowed.is_empty() || allow_any_ip {
                paths.push("allowed_cidrs".to_owned());
            }
            if expires_at.is_some() || no_expiry {
                paths.push("expires_at".to_owned());
            }
            if !rate_limits.is_empty() || no_rate_limits {
                paths.push("rate_limits".to_owned());
            }
            if credits.is_some() || no_credits {
                paths.push("credits".to_owned());
            }
            if !metadata.is_empty() || no_metadata {
                paths.push("metadata".to_owned());
            }
            if paths.is_empty() {
                bail!(
                    "nothing to change: give --name, --scope, --allow/--allow-any-ip, --expires-at/--no-expiry, --rate-limit/--no-rate-limits, --credits/--no-credits or --meta/--no-metadata"
                );
            }
            let request = pb::UpdateKeyRequest {
                merchant_id: merchant,
                key_id,
                name: name.unwrap_or_default(),
                scopes,
                allowed_cidrs: allowed,
                expires_at: timestamp("--expires-at", expires_at.as_deref())?,
                rate_limits: rate_limits.iter().map(|s| rate_limit(s)).collect::<anyhow::Result<_>>()?,
                credits: credits_of(credits, refill.as_deref())?,
                metadata: metadata_of(&metadata)?,
                update_mask: Some(prost_types::FieldMask { paths }),
            };
            let key =
                admin.update_key(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::key(conn.json, key.api_key.as_ref());
        }
        KeysCommand::Revoke { merchant, key_id, reason } => {
            let request = pb::RevokeKeyRequest { merchant_id: merchant, key_id, reason };
            let key =
                admin.revoke_key(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::key(conn.json, key.api_key.as_ref());
        }
        KeysCommand::Disable { merchant, key_id, reason } => {
            let request = pb::DisableKeyRequest { merchant_id: merchant, key_id, reason };
            let key =
                admin.disable_key(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::key(conn.json, key.api_key.as_ref());
        }
        KeysCommand::Enable { merchant, key_id } => {
            let request = pb::EnableKeyRequest { merchant_id: merchant, key_id };
            let key =
                admin.enable_key(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::key(conn.json, key.api_key.as_ref());
        }
        KeysCommand::ReportLeaked { source, url } => {
            let mut keys = Vec::new();
            for line in std::io::stdin().lines() {
                let line = line.context("reading keys from stdin")?;
                let key = line.trim();
                if !key.is_empty() {
                    keys.push(pb::LeakedKey {
                        key: key.to_owned(),
                        source: source.clone(),
                        url: url.clone(),
                    });
                }
            }
            if keys.is_empty() {
                bail!("no keys on stdin: give one key or operator token per line");
            }
            let request = pb::ReportLeakedKeysRequest { keys };
            let report = admin
                .report_leaked_keys(authorized(request, &token)?)
                .await
                .map_err(status_error)?
                .into_inner();
            render::leak_results(conn.json, &report.results);
        }
        KeysCommand::Regenerate { merchant, key_id, grace } => {
            let grace_period = grace.as_deref().map(duration).transpose()?;
            let request = pb::RegenerateKeyRequest { merchant_id: merchant, key_id, grace_period };
            let done =
                admin.regenerate_key(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::issued(conn.json, done.api_key.as_ref(), &done.plaintext_key, done.previous_key.as_ref());
        }
        KeysCommand::Usage { merchant, key_id } => {
            let request = pb::GetKeyUsageRequest { merchant_id: merchant, key_id };
            let usage =
                admin.get_key_usage(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
            render::usage(conn.json, &usage);
        }
    }
    Ok(())
}

pub async fn operators(conn: Connection, command: OperatorsCommand) -> anyhow::Result<()> {
    let token = token(&conn)?;
    let mut admin = KeyAdminClient::new(channel(&conn).await?);
    match command {
        OperatorsCommand::Create { name, role, merchants, expires_at } => {
            let role = match role.to_ascii_lowercase().replace('_', "-").as_str() {
                "admin" => pb::OperatorRole::Admin,
                "key-manager" => pb::OperatorRole::KeyManager,
                "auditor" => pb::OperatorRole::Auditor,
                "leak-reporter" => pb::OperatorRole::LeakReporter,
                other => bail!("--role {other:?}: use admin, key-manager, auditor or leak-reporter"),
            };
            let request = pb::CreateOperatorTokenRequest {
                name,
                role: role.into(),
                merchant_ids: merchants,
                expires_at: timestamp("--expires-at", expires_at.as_deref())?,
            };
            let created = admin
                .create_operator_token(authorized(request, &token)?)
                .await
                .map_err(status_error)?
                .into_inner();
            render::operator_issued(conn.json, created.operator_token.as_ref(), &created.plaintext_token);
        }
        OperatorsCommand::List { page_size, page_token } => {
            let request = pb::ListOperatorTokensRequest { page_size, page_token };
            let page = admin
                .list_operator_tokens(authorized(request, &token)?)
                .await
                .map_err(status_error)?
                .into_inner();
            render::operators(conn.json, &page.operator_tokens, &page.next_page_token);
        }
        OperatorsCommand::Revoke { id } => {
            let request = pb::RevokeOperatorTokenRequest { id };
            let revoked = admin
                .revoke_operator_token(authorized(request, &token)?)
                .await
                .map_err(status_error)?
                .into_inner();
            render::operators(conn.json, revoked.operator_token.as_slice(), "");
        }
    }
    Ok(())
}

pub async fn peppers(conn: Connection, command: PeppersCommand) -> anyhow::Result<()> {
    let token = token(&conn)?;
    let mut admin = KeyAdminClient::new(channel(&conn).await?);
    let PeppersCommand::Status = command;
    let status = admin
        .get_pepper_status(authorized(pb::GetPepperStatusRequest {}, &token)?)
        .await
        .map_err(status_error)?
        .into_inner();
    render::peppers(conn.json, &status.generations);
    Ok(())
}

pub async fn audit(conn: Connection, command: AuditCommand) -> anyhow::Result<()> {
    let token = token(&conn)?;
    let mut admin = KeyAdminClient::new(channel(&conn).await?);
    let AuditCommand::List { merchant, unattributed, key_id, since, until, page_size, page_token } = command;
    let request = pb::ListAuditEventsRequest {
        merchant_id: merchant,
        unattributed,
        api_key_id: key_id,
        start_time: timestamp("--since", since.as_deref())?,
        end_time: timestamp("--until", until.as_deref())?,
        page_size,
        page_token,
    };
    let page =
        admin.list_audit_events(authorized(request, &token)?).await.map_err(status_error)?.into_inner();
    render::audit(conn.json, &page.events, &page.next_page_token);
    Ok(())
}

pub async fn verify(
    conn: Connection,
    key: String,
    ip: String,
    scope: String,
    endpoint: String,
    method: String,
    cost: u32,
) -> anyhow::Result<()> {
    let key = if key == "-" {
        let mut buf = String::new();
        std::io::stdin().read_to_string(&mut buf).context("reading the key from standard input")?;
        buf.trim().to_owned()
    } else {
        key
    };
    let mut client = KeyVerifyClient::new(channel(&conn).await?);
    let request = pb::VerifyRequest { key, ip, required_scope: scope, endpoint, method, cost };
    let verdict = client.verify(request).await.map_err(status_error)?.into_inner();
    render::verdict(conn.json, &verdict);
    Ok(())
}

/// `NAME=VALUE` entries as a request's metadata; the server checks them.
fn metadata_of(entries: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some((name, value)) => Ok((name.to_owned(), value.to_owned())),
            None => bail!("--meta {e:?}: use NAME=VALUE"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_common_units() {
        assert_eq!(duration("90").unwrap().seconds, 90);
        assert_eq!(duration("30m").unwrap().seconds, 1800);
        assert_eq!(duration("24h").unwrap().seconds, 86_400);
        assert_eq!(duration("7d").unwrap().seconds, 604_800);
        assert!(duration("7w").is_err());
        assert!(duration("soon").is_err());
    }
}
