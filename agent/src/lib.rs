//! rvmm-agent: the init of the container-host guest, and the protocol it speaks with rvmm.

#[cfg(feature = "bundle")]
pub mod bundle;
pub mod protocol;
pub mod registry;
#[cfg(feature = "bundle")]
pub mod user;
