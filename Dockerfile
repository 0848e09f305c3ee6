# Multi-stage build: a static-enough binary on distroless, running as non-root.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake make g++ && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked && strip target/release/bedrock-gate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/bedrock-gate /usr/local/bin/bedrock-gate
# Mount your config here; AWS credentials come from the standard chain (task role, IRSA, env).
ENV BEDROCK_GATE_CONFIG=/etc/bedrock-gate/bedrock-gate.toml \
    BEDROCK_GATE_LISTEN=0.0.0.0:8787
EXPOSE 8787
USER nonroot
ENTRYPOINT ["/usr/local/bin/bedrock-gate"]
CMD ["serve"]
