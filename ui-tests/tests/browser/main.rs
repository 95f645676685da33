//! The web UI in a real headless Chromium against a real corral server.
//! One binary; each test starts its own server and browser.

mod cluster;
mod servers;
mod simulated;
