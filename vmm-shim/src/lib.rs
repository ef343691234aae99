//! vmm-shim: a thin KVM shim (rust-vmm's kvm-ioctls, kvm-bindings,
//! vm-memory, vmm-sys-util) that runs a VM whose LUN a lungate gateway
//! serves, and whose guest saves, lists and restores its own state in the
//! LUN's hidden region (docs/vmm-shim.md).
//!
//! It reaches the LUN only through the gateway: its disk over NBD
//! (`lungate_api::nbd`), its state records and snapshots through the
//! control API (`lungate_api::client`). It never opens the LUN file.
//!
//! One job per module: [`vm`] and [`memory`] (the KVM VM, its memory and
//! dirty log), [`boot`] (the entry state), [`vcpu`] (vCPU state and the run
//! loop), [`devices`] (serial, paravirtual disk, the port bus), [`state`]
//! (ports A and B: the guest state service), [`snapshot`] (state records:
//! save and restore), [`controller`] (what changes the running VM) and
//! [`control`] (the operator socket).

pub mod boot;
pub mod control;
pub mod controller;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod payload;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;
