//! HTTP tests of `hone-serve` against an in-process server on loopback (port 0) running the
//! real stories260k model: generation and streaming, continuous batching, adapters per request,
//! and every error and limit.

mod adapters;
mod errors;
mod generation;
mod support;
