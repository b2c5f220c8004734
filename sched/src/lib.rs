//! fog-sched: where chunks go. Network coordinates fitted from measured RTTs ([`coords`]) and the scheduler
//! that places each chunk on nearby nodes under bounded load ([`scheduler`]). Pure code, no I/O: the tracker
//! calls it for every resolve and probe, the simulator runs it at 10^6 nodes, and the scheduling benchmark
//! builds only this.

pub mod cells;
pub mod coords;
pub mod scheduler;
