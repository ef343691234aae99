//! A test hook: wrap every store the volume engine builds on this thread.
//!
//! The power-loss model (block/tests/volume_powerloss.rs) records every
//! write, barrier, layer creation and manifest commit that reaches a store.
//! It installs a wrapper here; [`Volume::open`](crate::volume::Volume::open)
//! and [`Volume::clone_to`](crate::volume::Volume::clone_to) pass the store
//! they build through [`wrapped`]. Without a wrapper (always, outside that
//! test) the store is returned unchanged.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use super::Store;

/// What a test wraps each new store in.
pub type Wrapper = Rc<dyn Fn(Arc<dyn Store>) -> Arc<dyn Store>>;

thread_local! {
    static WRAPPER: RefCell<Option<Wrapper>> = const { RefCell::new(None) };
}

/// Install (or with `None` remove) this thread's wrapper.
#[doc(hidden)]
pub fn set_wrapper(w: Option<Wrapper>) {
    WRAPPER.with(|c| *c.borrow_mut() = w);
}

/// `store`, passed through this thread's wrapper if a test installed one.
pub(crate) fn wrapped(store: Arc<dyn Store>) -> Arc<dyn Store> {
    match WRAPPER.with(|c| c.borrow().clone()) {
        Some(w) => w(store),
        None => store,
    }
}
