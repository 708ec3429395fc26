//! The migration state machine of DESIGN.md "Migration lifecycle", as pure functions.
//!
//! [`next`] is the one place that says which action may move a migration from which state, and
//! where it lands; the repository in `migrations.rs` applies its answer with a compare-and-set
//! on the stored state, so what this module refuses never reaches the database. Each state
//! also implies a routing state ([`MigrationState::routing_state`]), which the engine writes
//! in the same transaction as the state change.

use std::fmt;
use std::str::FromStr;

use super::RoutingState;

/// Where a migration is in its life. `migrated`, `failed` and `rolled_back` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    Pending,
    BulkCopy,
    DualWrite,
    Cutover,
    Migrated,
    Paused,
    Failed,
    RolledBack,
}

impl MigrationState {
    pub const ALL: [Self; 8] = [
        Self::Pending,
        Self::BulkCopy,
        Self::DualWrite,
        Self::Cutover,
        Self::Migrated,
        Self::Paused,
        Self::Failed,
        Self::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::BulkCopy => "bulk_copy",
            Self::DualWrite => "dual_write",
            Self::Cutover => "cutover",
            Self::Migrated => "migrated",
            Self::Paused => "paused",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }

    /// Whether no action can move the migration any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Migrated | Self::Failed | Self::RolledBack)
    }

    /// The tenant's routing state while its migration is in this state.
    ///
    /// `pending` has not touched the route yet (writes go to the source either way). `paused`
    /// routes as `bulk_copy` — source only, no mirror — whichever phase it paused: DESIGN.md
    /// sends a paused dual-writing tenant's writes to the source only, and unlike `normal` the
    /// route still names the migration, so `routing set` keeps refusing the tenant while it is
    /// paused. Terminal states route `normal` (on the target after `migrated`, on the source
    /// otherwise; see `MigrationRecord::implied_route`).
    pub fn routing_state(self) -> RoutingState {
        match self {
            Self::BulkCopy | Self::Paused => RoutingState::BulkCopy,
            Self::DualWrite => RoutingState::DualWrite,
            Self::Cutover => RoutingState::CutoverPaused,
            Self::Pending | Self::Migrated | Self::Failed | Self::RolledBack => {
                RoutingState::Normal
            }
        }
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MigrationState {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "state",
                name: s.to_owned(),
            })
    }
}

/// What can happen to a migration: the worker's steps, the operator's commands, and failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The worker starts the bulk copy.
    StartCopy,
    /// The copy reached its horizon: dual-write and tail start.
    CopyDone,
    /// Operator `pause`.
    Pause,
    /// Operator `resume`.
    Resume,
    /// Operator `cutover` (or `--cutover auto` at lag 0).
    Cutover,
    /// The fence moved and routing points at the target.
    CutoverDone,
    /// The cutover ran out of budget, failed verification, or crashed before the fence moved.
    CutoverRollback,
    /// Operator `abort`.
    Abort,
    /// An unrecoverable error, or `emergency-stop`.
    Fail,
}

impl Action {
    pub const ALL: [Self; 9] = [
        Self::StartCopy,
        Self::CopyDone,
        Self::Pause,
        Self::Resume,
        Self::Cutover,
        Self::CutoverDone,
        Self::CutoverRollback,
        Self::Abort,
        Self::Fail,
    ];

    /// The name the audit log records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StartCopy => "start_copy",
            Self::CopyDone => "copy_done",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Cutover => "cutover",
            Self::CutoverDone => "cutover_done",
            Self::CutoverRollback => "cutover_rollback",
            Self::Abort => "abort",
            Self::Fail => "fail",
        }
    }

    /// The states this action applies in (DESIGN.md's "from" column).
    pub fn allowed_from(self) -> &'static [MigrationState] {
        use MigrationState::{BulkCopy, Cutover, DualWrite, Paused, Pending};
        match self {
            Self::StartCopy => &[Pending],
            Self::CopyDone => &[BulkCopy],
            Self::Pause => &[BulkCopy, DualWrite],
            Self::Resume => &[Paused],
            Self::Cutover => &[DualWrite],
            Self::CutoverDone | Self::CutoverRollback => &[Cutover],
            Self::Abort | Self::Fail => &[Pending, BulkCopy, DualWrite, Cutover, Paused],
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|action| action.as_str() == s)
            .ok_or_else(|| UnknownName {
                kind: "action",
                name: s.to_owned(),
            })
    }
}

/// A state plus, while paused, the phase it paused: everything [`next`] decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    pub state: MigrationState,
    /// `Some` exactly while `state` is `paused`: `bulk_copy` or `dual_write`.
    pub paused_from: Option<MigrationState>,
}

impl Phase {
    pub const PENDING: Self = Self {
        state: MigrationState::Pending,
        paused_from: None,
    };
}

/// An action that DESIGN.md's table does not allow in the migration's state. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot {action} a migration that is {state}: {action} applies only to a migration that is {}",
    allowed_list(*action)
)]
pub struct IllegalTransition {
    pub state: MigrationState,
    pub paused_from: Option<MigrationState>,
    pub action: Action,
}

/// A state or action name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown migration {kind} {name:?}")]
pub struct UnknownName {
    pub kind: &'static str,
    pub name: String,
}

/// "a", "a or b", "a, b or c".
fn allowed_list(action: Action) -> String {
    let names: Vec<&str> = action.allowed_from().iter().map(|s| s.as_str()).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// The phase `action` moves `phase` to, or why it may not. The whole lifecycle table:
///
/// | from | action | to |
/// |---|---|---|
/// | pending | start_copy | bulk_copy |
/// | bulk_copy | copy_done | dual_write |
/// | bulk_copy, dual_write | pause | paused (remembering which) |
/// | paused | resume | the phase it paused |
/// | dual_write | cutover | cutover |
/// | cutover | cutover_done | migrated |
/// | cutover | cutover_rollback | dual_write |
/// | any non-terminal | abort | rolled_back |
/// | any non-terminal | fail | failed |
///
/// `abort` and `fail` are legal in `cutover`, as the table says. The fence lives in the source
/// store, not here, so no compare-and-set on this state can make an abort atomic with a running
/// cutover: the engine must let the cutover commit or roll back first (DESIGN.md "Abort"), e.g.
/// an `abort` that finds `cutover` waits for the state to leave it and then applies to what it
/// became (refused once `migrated`).
pub fn next(phase: Phase, action: Action) -> Result<Phase, IllegalTransition> {
    use MigrationState::{
        BulkCopy, Cutover, DualWrite, Failed, Migrated, Paused, Pending, RolledBack,
    };
    let illegal = IllegalTransition {
        state: phase.state,
        paused_from: phase.paused_from,
        action,
    };
    let to = |state| Phase {
        state,
        paused_from: None,
    };
    match (phase.state, action) {
        (Pending, Action::StartCopy) => Ok(to(BulkCopy)),
        (BulkCopy, Action::CopyDone) => Ok(to(DualWrite)),
        (from @ (BulkCopy | DualWrite), Action::Pause) => Ok(Phase {
            state: Paused,
            paused_from: Some(from),
        }),
        (Paused, Action::Resume) => match phase.paused_from {
            Some(from @ (BulkCopy | DualWrite)) => Ok(to(from)),
            // A paused record that does not say which phase it paused cannot resume; the
            // schema's CHECK keeps this from being stored.
            _ => Err(illegal),
        },
        (DualWrite, Action::Cutover) => Ok(to(Cutover)),
        (Cutover, Action::CutoverDone) => Ok(to(Migrated)),
        (Cutover, Action::CutoverRollback) => Ok(to(DualWrite)),
        (state, Action::Abort) if !state.is_terminal() => Ok(to(RolledBack)),
        (state, Action::Fail) if !state.is_terminal() => Ok(to(Failed)),
        _ => Err(illegal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use MigrationState::{
        BulkCopy, Cutover, DualWrite, Failed, Migrated, Paused, Pending, RolledBack,
    };

    /// DESIGN.md's table written out row by row, independently of `next`, as
    /// `(from, paused_from, action, to)`.
    fn spec() -> Vec<(
        MigrationState,
        Option<MigrationState>,
        Action,
        MigrationState,
    )> {
        let mut rows = vec![
            (Pending, None, Action::StartCopy, BulkCopy),
            (BulkCopy, None, Action::CopyDone, DualWrite),
            (BulkCopy, None, Action::Pause, Paused),
            (DualWrite, None, Action::Pause, Paused),
            (Paused, Some(BulkCopy), Action::Resume, BulkCopy),
            (Paused, Some(DualWrite), Action::Resume, DualWrite),
            (DualWrite, None, Action::Cutover, Cutover),
            (Cutover, None, Action::CutoverDone, Migrated),
            (Cutover, None, Action::CutoverRollback, DualWrite),
        ];
        for (from, paused_from) in [
            (Pending, None),
            (BulkCopy, None),
            (DualWrite, None),
            (Cutover, None),
            (Paused, Some(BulkCopy)),
            (Paused, Some(DualWrite)),
        ] {
            rows.push((from, paused_from, Action::Abort, RolledBack));
            rows.push((from, paused_from, Action::Fail, Failed));
        }
        rows
    }

    fn every_phase() -> Vec<Phase> {
        let mut phases: Vec<Phase> = MigrationState::ALL
            .into_iter()
            .filter(|s| *s != Paused)
            .map(|state| Phase {
                state,
                paused_from: None,
            })
            .collect();
        for from in [BulkCopy, DualWrite] {
            phases.push(Phase {
                state: Paused,
                paused_from: Some(from),
            });
        }
        phases
    }

    #[test]
    fn next_is_exactly_the_design_table() {
        let spec = spec();
        for phase in every_phase() {
            for action in Action::ALL {
                let expected = spec
                    .iter()
                    .find(|(from, pf, a, _)| {
                        *from == phase.state && *pf == phase.paused_from && *a == action
                    })
                    .map(|(_, _, _, to)| *to);
                let got = next(phase, action);
                match expected {
                    Some(to) => {
                        let got = got.unwrap_or_else(|e| panic!("{phase:?} {action}: {e}"));
                        assert_eq!(got.state, to, "{phase:?} {action}");
                        assert_eq!(got.paused_from.is_some(), to == Paused);
                        assert!(action.allowed_from().contains(&phase.state));
                    }
                    None => {
                        let err = got.expect_err("not in the table");
                        assert_eq!(err.state, phase.state);
                        assert_eq!(err.action, action);
                    }
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for state in MigrationState::ALL {
            assert_eq!(state.as_str().parse::<MigrationState>(), Ok(state));
            let json = serde_json::to_string(&state).expect("serialize");
            assert_eq!(json, format!("\"{state}\""));
        }
        for action in Action::ALL {
            assert_eq!(action.as_str().parse::<Action>(), Ok(action));
            let json = serde_json::to_string(&action).expect("serialize");
            assert_eq!(json, format!("\"{action}\""));
        }
        assert!("done".parse::<MigrationState>().is_err());
        assert!("explode".parse::<Action>().is_err());
    }

    #[test]
    fn illegal_transitions_say_what_would_be_allowed() {
        let err = next(
            Phase {
                state: Migrated,
                paused_from: None,
            },
            Action::Abort,
        )
        .expect_err("terminal");
        let text = err.to_string();
        assert!(
            text.starts_with("cannot abort a migration that is migrated"),
            "{text}"
        );
        assert!(
            text.ends_with("pending, bulk_copy, dual_write, cutover or paused"),
            "{text}"
        );
    }

    #[test]
    fn a_paused_record_without_its_phase_cannot_resume() {
        let broken = Phase {
            state: Paused,
            paused_from: None,
        };
        assert!(next(broken, Action::Resume).is_err());
        assert_eq!(next(broken, Action::Abort).map(|p| p.state), Ok(RolledBack));
    }

    #[test]
    fn routing_follows_the_state() {
        assert_eq!(Pending.routing_state(), RoutingState::Normal);
        assert_eq!(BulkCopy.routing_state(), RoutingState::BulkCopy);
        assert_eq!(DualWrite.routing_state(), RoutingState::DualWrite);
        assert_eq!(Paused.routing_state(), RoutingState::BulkCopy);
        assert_eq!(Cutover.routing_state(), RoutingState::CutoverPaused);
        for state in MigrationState::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert_eq!(state.routing_state(), RoutingState::Normal);
        }
    }

    proptest! {
        #[test]
        fn random_action_sequences_keep_the_lifecycle(
            start in proptest::sample::select(every_phase()),
            actions in proptest::collection::vec(proptest::sample::select(Action::ALL.to_vec()), 0..40)
        ) {
            let mut phase = start;
            // The phase each pause left, to check that resume returns to it.
            let mut paused_at: Option<MigrationState> = start.paused_from;
            for action in actions {
                let before = phase;
                match next(phase, action) {
                    Ok(after) => {
                        prop_assert!(!before.state.is_terminal(), "{before:?} moved on {action}");
                        prop_assert!(action.allowed_from().contains(&before.state));
                        if action == Action::Pause {
                            paused_at = Some(before.state);
                        }
                        if before.state == Paused {
                            prop_assert!(after.state != Paused);
                            if action == Action::Resume {
                                prop_assert_eq!(Some(after.state), paused_at);
                            }
                        }
                        phase = after;
                    }
                    Err(err) => {
                        // Refused: the phase we hold is untouched and the error names it.
                        prop_assert_eq!(err.state, before.state);
                        prop_assert_eq!(err.paused_from, before.paused_from);
                        prop_assert!(
                            before.state.is_terminal() || !action.allowed_from().contains(&before.state)
                        );
                    }
                }
                prop_assert_eq!(phase.paused_from.is_some(), phase.state == Paused);
                if let Some(from) = phase.paused_from {
                    prop_assert!(from == BulkCopy || from == DualWrite);
                }
                if before.state.is_terminal() {
                    prop_assert_eq!(phase, before);
                }
            }
        }
    }
}
