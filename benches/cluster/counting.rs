//! The counting allocator: live bytes, only while `COUNTING` is set (the `memory` child sets it
//! first thing, so every allocation it makes is counted; elsewhere the cost is one relaxed load).

use std::alloc::{GlobalAlloc, Layout, System};

use super::*;

pub(crate) struct Counting;

pub(crate) static COUNTING: AtomicBool = AtomicBool::new(false);

pub(crate) static LIVE: AtomicIsize = AtomicIsize::new(0);

pub(crate) fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// adds bookkeeping on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
pub(crate) static ALLOC: Counting = Counting;

pub(crate) fn live_bytes() -> isize {
    LIVE.load(Ordering::SeqCst)
}
