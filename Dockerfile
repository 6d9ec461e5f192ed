# syntax=docker/dockerfile:1
# keywarden: a small, non-root image that runs `keywarden serve`.
#
#   docker build -t keywarden:0.1.0 .
#   docker run --rm -p 50051:50051 -p 9464:9464 \
#     -e KEYWARDEN_DATABASE_URL=postgres://… -e KEYWARDEN_PEPPER=… -e KEYWARDEN_ADMIN_TOKEN=… \
#     keywarden:0.1.0
#
# The Helm chart runs the same image with `migrate` as a pre-install/
# pre-upgrade hook and `serve` for the replicas.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
# The patched sqlx-core that [patch.crates-io] points at (vendor/README.md).
COPY vendor ./vendor
COPY proto ./proto
# A workspace member: its manifest is needed to resolve the workspace.
COPY client ./client
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/verify.rs \
    && cargo build --release --locked --bin keywarden || true
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin keywarden \
    && cp target/release/keywarden /keywarden

# distroless/cc: glibc and CA certificates, no shell, no package manager;
# the :nonroot tag runs as uid 65532, matching the chart's securityContext.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /keywarden /keywarden
USER 65532:65532
EXPOSE 50051 9464
# On 0.0.0.0 the server refuses plaintext unless TLS is configured
# (KEYWARDEN_TLS_CERT_FILE/KEY_FILE) or KEYWARDEN_ALLOW_PLAINTEXT=true says
# a mesh terminates mTLS; the Helm chart sets one or the other.
ENV KEYWARDEN_LISTEN_ADDR=0.0.0.0:50051 \
    KEYWARDEN_METRICS_ADDR=0.0.0.0:9464 \
    KEYWARDEN_LOG_FORMAT=json \
    KEYWARDEN_DATA_DIR=/tmp/keywarden
ENTRYPOINT ["/keywarden"]
CMD ["serve"]
