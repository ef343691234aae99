//! A write-only 16550 console on COM1: bytes the guest writes to the data
//! register go to a file or stdout, as they come.

use std::io::Write;

pub struct Serial {
    out: Box<dyn Write + Send>,
}

impl Serial {
    pub fn new(out: Box<dyn Write + Send>) -> Serial {
        Serial { out }
    }

    pub fn write(&mut self, data: &[u8]) {
        // A console that cannot be written must not stop the guest.
        let _ = self.out.write_all(data);
        if data.contains(&b'\n') {
            let _ = self.out.flush();
        }
    }
}
