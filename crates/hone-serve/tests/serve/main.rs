//! HTTP tests of `hone-serve` against an in-process server on loopback (port 0) running the
//! real stories260k model: generation and streaming, continuous batching, adapters per request,
//! every error and limit, and the timeouts that bound slow clients and shutdown.

mod adapters;
mod errors;
mod generation;
mod rag;
mod support;
mod timeouts;
