# bedrock-gate: the release binary on distroless (glibc + CA certificates), as a non-root user.
#
#   docker build -t bedrock-gate .
#   docker run -d -p 8787:8787 \
#     -v "$PWD/config:/etc/bedrock-gate:ro" -v bedrock-gate-ledger:/var/lib/bedrock-gate \
#     bedrock-gate
#
# - Config: mounted read-only at /etc/bedrock-gate/bedrock-gate.toml (mount the directory, not
#   the file, so edits and `bedrock-gate users|keys` renames are seen and reloaded live).
# - Ledger: /var/lib/bedrock-gate/bedrock-gate.db on a volume, whatever `ledger.path` says.
# - AWS credentials: the standard chain at run time (ECS task role, IRSA / EKS Pod Identity,
#   instance profile, or AWS_* env vars); nothing is baked into the image.
# - Health: `bedrock-gate healthcheck` probes the admin listener's /healthz (no curl here).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# aws-lc-rs builds C with cmake.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake make g++ \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin bedrock-gate \
    && strip target/release/bedrock-gate \
    && mkdir -p /out/var/lib/bedrock-gate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bedrock-gate /usr/local/bin/bedrock-gate
COPY --from=build --chown=nonroot:nonroot /out/var/lib/bedrock-gate /var/lib/bedrock-gate
ENV BEDROCK_GATE_CONFIG=/etc/bedrock-gate/bedrock-gate.toml \
    BEDROCK_GATE_LISTEN=0.0.0.0:8787 \
    BEDROCK_GATE_ADMIN_LISTEN=0.0.0.0:9464 \
    BEDROCK_GATE_LEDGER=/var/lib/bedrock-gate/bedrock-gate.db \
    BEDROCK_GATE_LOG_FORMAT=json \
    BEDROCK_GATE_HEALTHCHECK_URL=http://127.0.0.1:9464/healthz
EXPOSE 8787 9464
VOLUME ["/var/lib/bedrock-gate"]
USER nonroot
HEALTHCHECK --interval=15s --timeout=6s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/bedrock-gate", "healthcheck"]
# SIGTERM: stop accepting, let streams finish (--shutdown-grace-secs, 30 s), flush the ledger.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/bedrock-gate"]
CMD ["serve"]
