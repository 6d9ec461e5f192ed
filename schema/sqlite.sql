-- The schema the migrations leave (tests/api/schema.rs): regenerate with
-- KEYWARDEN_BLESS_SCHEMA=1 cargo test --locked --test api schema::

CREATE TABLE api_keys (
    allowed_cidrs text NOT NULL,
    created_at timestamp_with_timezone_text NOT NULL,
    created_by varchar NOT NULL,
    credits_epoch integer NOT NULL DEFAULT 0,
    credits_refill_amount integer,
    credits_refill_interval varchar,
    credits_refilled_at timestamp_with_timezone_text,
    credits_remaining integer,
    credits_seq integer NOT NULL DEFAULT 0,
    denied_count integer NOT NULL DEFAULT 0,
    disabled_at timestamp_with_timezone_text,
    disabled_reason text,
    expires_at timestamp_with_timezone_text,
    id varchar NOT NULL,
    key_hash varchar NOT NULL,
    last_used_at timestamp_with_timezone_text,
    merchant_id varchar NOT NULL,
    metadata text NOT NULL DEFAULT '{}',
    name varchar NOT NULL,
    pepper varchar NOT NULL DEFAULT '1',
    prefix varchar NOT NULL,
    rate_limits varchar NOT NULL DEFAULT '',
    replaced_by_key_id varchar,
    request_count integer NOT NULL DEFAULT 0,
    revoke_reason text,
    revoked_at timestamp_with_timezone_text,
    scopes text NOT NULL,
    updated_at timestamp_with_timezone_text NOT NULL,
    version integer NOT NULL DEFAULT 1
);

CREATE TABLE audit_dead_letters (
    failed_at timestamp_with_timezone_text NOT NULL,
    id varchar NOT NULL,
    reason text NOT NULL,
    row text NOT NULL
);

CREATE TABLE audit_events (
    actor varchar,
    api_key_id varchar,
    api_key_name varchar,
    count integer,
    decision varchar,
    deny_reason varchar,
    detail text,
    endpoint text,
    id varchar NOT NULL,
    ip varchar,
    key_prefix varchar,
    kind varchar NOT NULL,
    merchant_id varchar,
    method varchar,
    status integer,
    timestamp timestamp_with_timezone_text NOT NULL,
    trace_id varchar
);

CREATE TABLE audit_outcomes (
    event_id varchar NOT NULL,
    received_at timestamp_with_timezone_text NOT NULL,
    status integer NOT NULL
);

CREATE TABLE event_deliveries (
    attempts integer NOT NULL DEFAULT 0,
    created_at timestamp_with_timezone_text NOT NULL,
    event_seq integer NOT NULL,
    key_id varchar NOT NULL,
    last_attempt_at timestamp_with_timezone_text,
    last_error varchar,
    last_status integer,
    next_attempt_at timestamp_with_timezone_text NOT NULL,
    sink varchar NOT NULL,
    state varchar NOT NULL
);

CREATE TABLE event_leases (
    holder varchar NOT NULL,
    name varchar NOT NULL,
    until timestamp_with_timezone_text NOT NULL
);

CREATE TABLE key_events (
    body text NOT NULL,
    id varchar NOT NULL,
    key_id varchar NOT NULL,
    merchant_id varchar NOT NULL,
    occasion varchar,
    position integer,
    seq integer NOT NULL,
    time timestamp_with_timezone_text NOT NULL,
    type varchar NOT NULL
);

CREATE TABLE operator_tokens (
    created_at timestamp_with_timezone_text NOT NULL,
    created_by varchar NOT NULL,
    digest varchar NOT NULL,
    expires_at timestamp_with_timezone_text,
    id varchar NOT NULL,
    merchant_ids text NOT NULL,
    name varchar NOT NULL,
    pepper varchar NOT NULL DEFAULT '1',
    prefix varchar NOT NULL,
    revoked_at timestamp_with_timezone_text,
    role varchar NOT NULL
);

CREATE TABLE usage_flushes (
    applied_at timestamp_with_timezone_text NOT NULL,
    id varchar NOT NULL
);

CREATE TABLE webhook_endpoints (
    created_at timestamp_with_timezone_text NOT NULL,
    created_by varchar NOT NULL,
    event_types text NOT NULL,
    id varchar NOT NULL,
    merchant_id varchar NOT NULL,
    pepper varchar NOT NULL,
    sealed_secret varchar NOT NULL,
    url text NOT NULL
);

CREATE INDEX "api_keys_expires_at" ON "api_keys" ("expires_at");
CREATE INDEX "api_keys_revoked_at" ON "api_keys" ("revoked_at");
CREATE INDEX "event_deliveries_due" ON "event_deliveries" ("sink", "state", "key_id", "event_seq");
CREATE INDEX "idx_api_keys_merchant_created" ON "api_keys" ("merchant_id", "created_at", "id");
CREATE INDEX "idx_audit_events_key_ts" ON "audit_events" ("api_key_id", "timestamp", "id");
CREATE INDEX "idx_audit_events_merchant_ts" ON "audit_events" ("merchant_id", "timestamp", "id");
CREATE INDEX "idx_audit_events_ts" ON "audit_events" ("timestamp");
CREATE INDEX "key_events_fan_out" ON "key_events" ("position", "seq");
CREATE INDEX "key_events_merchant" ON "key_events" ("merchant_id", "position");
CREATE INDEX "usage_flushes_applied_at" ON "usage_flushes" ("applied_at");
