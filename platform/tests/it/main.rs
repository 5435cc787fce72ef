//! Integration tests: the real platform, in-process on port 0, against the real MongoDB-
//! compatible server and the real RabbitMQ named by `MONGODB_URI` and `AMQP_URI` (or
//! containers when Docker answers). Each test gets its own namespace, so they run in parallel.

mod apps;
mod batch;
mod coredms;
mod foundation;
mod harness;
mod stream;
