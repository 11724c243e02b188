//! The VM lifecycle: its states and the one table of which operation is valid in which state
//! (cloud-hypervisor's `VmState::valid_transition` is the model). [`crate::Vm`]'s pause,
//! resume, freeze, stop and state save/restore all ask [`VmState::transition`] first and fail
//! with a typed [`StateError`].
//!
//! ```text
//!             READY             pause              resume
//!  Booting ----------> Running <-------> Paused ---------> (the state before the pause)
//!     |  pause/resume     |                 |   freeze, save/restore state, swap memory
//!     +--------+----------+-----------------+
//!              | stop, power-off, failure
//!              v
//!        Stopped / Failed (final)
//! ```

use std::fmt;

/// Lifecycle state of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Started, READY not yet reported.
    Booting,
    /// READY reported.
    Running,
    /// vCPUs paused by the host.
    Paused,
    /// Powered off or stopped by the host.
    Stopped,
    /// Failed (the reason).
    Failed(String),
}

/// An operation on a VM's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOp {
    /// Take the vCPUs out of the guest.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// Freeze memory and machine state into a generation image (clone, snapshot).
    Freeze,
    /// Stop the VM.
    Stop,
    /// Save or restore vCPU or device state.
    SaveState,
    /// Replace guest RAM.
    SwapMemory,
}

impl fmt::Display for VmOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmOp::Pause => "pause",
            VmOp::Resume => "resume",
            VmOp::Freeze => "clone or snapshot",
            VmOp::Stop => "stop",
            VmOp::SaveState => "save or restore vCPU/device state",
            VmOp::SwapMemory => "swap guest memory",
        })
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmState::Booting => f.write_str("booting"),
            VmState::Running => f.write_str("running"),
            VmState::Paused => f.write_str("paused"),
            VmState::Stopped => f.write_str("stopped"),
            VmState::Failed(why) => write!(f, "failed ({why})"),
        }
    }
}

/// An operation that is not valid in the VM's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VM is {state}, cannot {op}{}", hint(*.op))]
pub struct StateError {
    /// What was attempted.
    pub op: VmOp,
    /// The state the VM was in.
    pub state: VmState,
}

fn hint(op: VmOp) -> &'static str {
    match op {
        VmOp::Resume => "; only a paused VM can be resumed",
        VmOp::SaveState | VmOp::SwapMemory => "; pause the VM first",
        VmOp::Pause | VmOp::Freeze => "; the VM must be booting or running (or paused to freeze)",
        VmOp::Stop => "",
    }
}

impl VmState {
    /// The state after `op` from this state (`paused_from`: the state a paused VM resumes
    /// to), or why `op` is not valid here. This is the whole lifecycle table.
    pub fn transition(&self, op: VmOp, paused_from: &VmState) -> Result<VmState, StateError> {
        use VmState::*;
        let next = match (self, op) {
            (Booting | Running, VmOp::Pause) => Some(Paused),
            (Paused, VmOp::Resume) => Some(paused_from.clone()),
            // A freeze pauses a running VM briefly and leaves it as it was.
            (Running | Paused, VmOp::Freeze) => Some(self.clone()),
            (Paused, VmOp::SaveState | VmOp::SwapMemory) => Some(Paused),
            (Booting | Running | Paused, VmOp::Stop) => Some(Stopped),
            // Stopping an ended VM is a no-op: it keeps its outcome.
            (Stopped | Failed(_), VmOp::Stop) => Some(self.clone()),
            _ => None,
        };
        next.ok_or_else(|| StateError {
            op,
            state: self.clone(),
        })
    }

    /// True if `op` is valid in this state.
    pub fn allows(&self, op: VmOp) -> bool {
        self.transition(op, &VmState::Running).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_allows_exactly_the_lifecycle() {
        use VmState::*;
        let failed = Failed("x".into());
        let states = [Booting, Running, Paused, Stopped, failed.clone()];
        let ops = [
            VmOp::Pause,
            VmOp::Resume,
            VmOp::Freeze,
            VmOp::Stop,
            VmOp::SaveState,
            VmOp::SwapMemory,
        ];
        let allowed: Vec<(VmState, VmOp)> = states
            .iter()
            .flat_map(|s| ops.iter().map(move |&o| (s.clone(), o)))
            .filter(|(s, o)| s.allows(*o))
            .collect();
        assert_eq!(
            allowed,
            vec![
                (Booting, VmOp::Pause),
                (Booting, VmOp::Stop),
                (Running, VmOp::Pause),
                (Running, VmOp::Freeze),
                (Running, VmOp::Stop),
                (Paused, VmOp::Resume),
                (Paused, VmOp::Freeze),
                (Paused, VmOp::Stop),
                (Paused, VmOp::SaveState),
                (Paused, VmOp::SwapMemory),
                (Stopped, VmOp::Stop),
                (failed.clone(), VmOp::Stop),
            ]
        );
        assert_eq!(Paused.transition(VmOp::Resume, &Booting), Ok(Booting));
        let e = Stopped.transition(VmOp::Resume, &Running).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM is stopped, cannot resume; only a paused VM can be resumed"
        );
        assert_eq!(
            Running
                .transition(VmOp::SaveState, &Running)
                .unwrap_err()
                .state,
            Running
        );
    }
}
