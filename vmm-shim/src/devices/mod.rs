//! The devices on the guest's I/O ports, behind one [`Bus`] that a vCPU
//! thread hands every port exit to: the serial console ([`serial`]), the
//! paravirtual disk ([`block`]), ports A and B of the guest state service
//! ([`crate::state`]) and the payload's exit port. Every device is
//! synchronous: an `OUT` that starts I/O returns when it is done, so a
//! paused vCPU never leaves a request in flight.

pub mod block;
pub mod serial;

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::layout::{PORT_A, PORT_B, PORT_BLK, PORT_EXIT, SERIAL};
use crate::memory::GuestRam;
use crate::state::{Request, StateService};
use crate::vcpu::Report;

/// A guest request the state service accepted, for the controller.
#[derive(Debug)]
pub struct GuestRequest {
    /// Which VM (the controller's count of VMs it built) asked: a request
    /// still queued when its VM was replaced by a restore is dropped.
    pub instance: u64,
    pub vcpu: u32,
    pub id: u32,
    pub request: Request,
}

pub struct Bus {
    pub ram: Arc<GuestRam>,
    pub serial: Arc<Mutex<serial::Serial>>,
    pub block: Arc<Mutex<block::BlockDevice>>,
    pub state: Arc<Mutex<StateService>>,
    pub requests: Sender<GuestRequest>,
    pub instance: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn le_u32(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

impl Bus {
    /// An `OUT`; a [`Report`] if the vCPU must stop.
    pub fn io_out(&self, vcpu: u32, port: u16, data: &[u8]) -> Option<Report> {
        match port {
            SERIAL => {
                lock(&self.serial).write(data);
                None
            }
            PORT_A => {
                let addr = u64::from(le_u32(data));
                let accepted = lock(&self.state).submit(vcpu, &self.ram, addr);
                if let Some((id, request)) = accepted {
                    let _ = self.requests.send(GuestRequest {
                        instance: self.instance,
                        vcpu,
                        id,
                        request,
                    });
                }
                None
            }
            PORT_B => {
                let addr = u64::from(le_u32(data));
                lock(&self.state).deliver(&self.ram, addr);
                None
            }
            PORT_BLK => {
                let addr = u64::from(le_u32(data));
                lock(&self.block).doorbell(&self.ram, addr);
                None
            }
            PORT_EXIT => Some(Report::GuestExit(data.first().copied().unwrap_or(0xff))),
            _ => None,
        }
    }

    /// An `IN`: fill `data`.
    pub fn io_in(&self, vcpu: u32, port: u16, data: &mut [u8]) {
        data.fill(0);
        let v: u32 = match port {
            // Line status: transmitter empty and idle, so a driver that
            // polls it before writing never waits.
            p if p == SERIAL + 5 => 0x60,
            PORT_A => lock(&self.state).last_id(vcpu),
            PORT_B => lock(&self.state).next_len(),
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }
}
