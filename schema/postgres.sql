-- The schema the migrations leave (tests/api/schema.rs): regenerate with
-- KEYWARDEN_BLESS_SCHEMA=1 cargo test --locked --test api schema::

CREATE TABLE api_keys (
    allowed_cidrs text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    created_by character varying NOT NULL,
    credits_epoch bigint NOT NULL DEFAULT 0,
    credits_refill_amount bigint,
    credits_refill_interval character varying,
    credits_refilled_at timestamp with time zone,
    credits_remaining bigint,
    credits_seq bigint NOT NULL DEFAULT 0,
    denied_count bigint NOT NULL DEFAULT 0,
    disabled_at timestamp with time zone,
    disabled_reason text,
    expires_at timestamp with time zone,
    id character varying NOT NULL,
    key_hash character varying NOT NULL,
    last_used_at timestamp with time zone,
    merchant_id character varying NOT NULL,
    metadata text NOT NULL DEFAULT '{}'::text,
    name character varying NOT NULL,
    pepper character varying NOT NULL DEFAULT '1'::character varying,
    prefix character varying NOT NULL,
    rate_limits character varying NOT NULL DEFAULT ''::character varying,
    replaced_by_key_id character varying,
    request_count bigint NOT NULL DEFAULT 0,
    revoke_reason text,
    revoked_at timestamp with time zone,
    scopes text NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    version bigint NOT NULL DEFAULT 1
);

CREATE TABLE audit_dead_letters (
    failed_at timestamp with time zone NOT NULL,
    id character varying NOT NULL,
    reason text NOT NULL,
    row text NOT NULL
);

CREATE TABLE audit_events (
    actor character varying,
    api_key_id character varying,
    api_key_name character varying,
    count integer,
    decision character varying,
    deny_reason character varying,
    detail text,
    endpoint text,
    id character varying NOT NULL,
    ip character varying,
    key_prefix character varying,
    kind character varying NOT NULL,
    merchant_id character varying,
    method character varying,
    status integer,
    timestamp timestamp with time zone NOT NULL,
    trace_id character varying
);

CREATE TABLE audit_outcomes (
    event_id character varying NOT NULL,
    received_at timestamp with time zone NOT NULL,
    status integer NOT NULL
);

CREATE TABLE event_deliveries (
    attempts integer NOT NULL DEFAULT 0,
    created_at timestamp with time zone NOT NULL,
    event_seq bigint NOT NULL,
    key_id character varying NOT NULL,
    last_attempt_at timestamp with time zone,
    last_error character varying,
    last_status integer,
    next_attempt_at timestamp with time zone NOT NULL,
    sink character varying NOT NULL,
    state character varying NOT NULL
);

CREATE TABLE event_leases (
    holder character varying NOT NULL,
    name character varying NOT NULL,
    until timestamp with time zone NOT NULL
);

CREATE TABLE key_events (
    body text NOT NULL,
    id character varying NOT NULL,
    key_id character varying NOT NULL,
    merchant_id character varying NOT NULL,
    occasion character varying,
    position bigint,
    seq bigint NOT NULL,
    time timestamp with time zone NOT NULL,
    type character varying NOT NULL
);

CREATE TABLE operator_tokens (
    created_at timestamp with time zone NOT NULL,
    created_by character varying NOT NULL,
    digest character varying NOT NULL,
    expires_at timestamp with time zone,
    id character varying NOT NULL,
    merchant_ids text NOT NULL,
    name character varying NOT NULL,
    pepper character varying NOT NULL DEFAULT '1'::character varying,
    prefix character varying NOT NULL,
    revoked_at timestamp with time zone,
    role character varying NOT NULL
);

CREATE TABLE usage_flushes (
    applied_at timestamp with time zone NOT NULL,
    id character varying NOT NULL
);

CREATE TABLE webhook_endpoints (
    created_at timestamp with time zone NOT NULL,
    created_by character varying NOT NULL,
    event_types text NOT NULL,
    id character varying NOT NULL,
    merchant_id character varying NOT NULL,
    pepper character varying NOT NULL,
    sealed_secret character varying NOT NULL,
    url text NOT NULL
);

CREATE INDEX api_keys_expires_at ON public.api_keys USING btree (expires_at);
CREATE INDEX api_keys_revoked_at ON public.api_keys USING btree (revoked_at);
CREATE INDEX event_deliveries_due ON public.event_deliveries USING btree (sink, state, key_id, event_seq);
CREATE INDEX idx_api_keys_merchant_created ON public.api_keys USING btree (merchant_id, created_at, id);
CREATE INDEX idx_audit_events_key_ts ON public.audit_events USING btree (api_key_id, "timestamp", id);
CREATE INDEX idx_audit_events_merchant_ts ON public.audit_events USING btree (merchant_id, "timestamp", id);
CREATE INDEX idx_audit_events_ts ON public.audit_events USING btree ("timestamp");
CREATE INDEX key_events_fan_out ON public.key_events USING btree ("position", seq);
CREATE INDEX key_events_merchant ON public.key_events USING btree (merchant_id, "position");
CREATE INDEX usage_flushes_applied_at ON public.usage_flushes USING btree (applied_at);
CREATE UNIQUE INDEX api_keys_pkey ON public.api_keys USING btree (id);
CREATE UNIQUE INDEX api_keys_prefix_key ON public.api_keys USING btree (prefix);
CREATE UNIQUE INDEX audit_dead_letters_pkey ON public.audit_dead_letters USING btree (id);
CREATE UNIQUE INDEX audit_events_pkey ON public.audit_events USING btree (id);
CREATE UNIQUE INDEX audit_outcomes_pkey ON public.audit_outcomes USING btree (event_id);
CREATE UNIQUE INDEX event_deliveries_pkey ON public.event_deliveries USING btree (event_seq, sink);
CREATE UNIQUE INDEX event_leases_pkey ON public.event_leases USING btree (name);
CREATE UNIQUE INDEX key_events_id_key ON public.key_events USING btree (id);
CREATE UNIQUE INDEX key_events_occasion_key ON public.key_events USING btree (occasion);
CREATE UNIQUE INDEX key_events_pkey ON public.key_events USING btree (seq);
CREATE UNIQUE INDEX key_events_position_key ON public.key_events USING btree ("position");
CREATE UNIQUE INDEX operator_tokens_pkey ON public.operator_tokens USING btree (id);
CREATE UNIQUE INDEX operator_tokens_prefix_key ON public.operator_tokens USING btree (prefix);
CREATE UNIQUE INDEX usage_flushes_pkey ON public.usage_flushes USING btree (id);
CREATE UNIQUE INDEX webhook_endpoints_pkey ON public.webhook_endpoints USING btree (id);
