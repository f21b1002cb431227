//! Integration tests of the stress-test binary against an order-service running
//! in the test, on the test's own database. No consumer runs: orders stay
//! PENDING unless a test decides them itself.

mod helpers;
mod keys;
mod report;
