//! Integration tests: the real platform, in-process on port 0, against the real MongoDB-
//! compatible server and the real RabbitMQ named by `MONGODB_URI` and `AMQP_URI` (or
//! containers when Docker answers). Each test gets its own namespace, so they run in parallel.

mod accounting;
mod apps;
mod badinput;
mod batch;
mod contract;
mod coredms;
mod deploy;
mod faults;
mod foundation;
mod harness;
mod http_limits;
mod poison;
mod replicas;
mod sandbox;
mod split;
mod stream;
