# Multi-stage build: the release binary on distroless (glibc, CA certificates), non-root.
# Config is mounted read-only at /etc/bedrock-gate/bedrock-gate.toml; set
#   [ledger] path = "/var/lib/bedrock-gate/bedrock-gate.db"
# in it and mount a volume at /var/lib/bedrock-gate so usage survives restarts.
# AWS credentials come from the standard chain (ECS task role, IRSA, env); nothing is baked in.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake make g++ && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/bedrock-gate && mkdir -p /out/var/lib/bedrock-gate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bedrock-gate /usr/local/bin/bedrock-gate
COPY --from=build --chown=nonroot:nonroot /out/var/lib/bedrock-gate /var/lib/bedrock-gate
ENV BEDROCK_GATE_CONFIG=/etc/bedrock-gate/bedrock-gate.toml \
    BEDROCK_GATE_LISTEN=0.0.0.0:8787 \
    BEDROCK_GATE_ADMIN_LISTEN=0.0.0.0:9464
EXPOSE 8787 9464
VOLUME ["/var/lib/bedrock-gate"]
USER nonroot
ENTRYPOINT ["/usr/local/bin/bedrock-gate"]
CMD ["serve"]
