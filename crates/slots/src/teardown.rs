//! Exactly-once teardown of an object several cores use (after HAProxy's `FD_MUST_CLOSE`).
//!
//! The bug this prevents: each user clears its "running" bit and then checks "am I the last
//! one?". Between the clear and the check another user can set and clear its own bit, so both
//! see "nobody else" and both close. Here the close is decided only by atomically clearing a
//! must-close flag that the deleter set: whoever clears it (and only that party) closes.

use core::fmt;

use crate::sync::{AtomicU32, Ordering};

/// The deleter has asked for the object to be closed; sticky. New users are refused.
const DELETED: u32 = 1 << 31;
/// The close is still to be done. Set once by the deleter, cleared once by the closer.
const MUST_CLOSE: u32 = 1 << 30;
/// One bit per user currently inside.
const RUNNING: u32 = MUST_CLOSE - 1;

/// How many distinct users ([`UserId`] values `0..MAX_USERS`) a [`Teardown`] tracks.
pub const MAX_USERS: u8 = 30;

/// A user (core, thread, queue) of a shared object, `0..MAX_USERS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserId(u8);

impl UserId {
    /// Checks `id < MAX_USERS`.
    ///
    /// # Errors
    /// [`TeardownError::BadUser`] otherwise.
    pub const fn new(id: u8) -> Result<Self, TeardownError> {
        if id < MAX_USERS {
            Ok(Self(id))
        } else {
            Err(TeardownError::BadUser { id })
        }
    }

    /// The id as a number.
    pub const fn get(self) -> u8 {
        self.0
    }

    const fn bit(self) -> u32 {
        1 << self.0
    }
}

/// What the caller must do about the close after a [`Teardown`] operation.
#[must_use = "if this is RunClose, the caller alone must close the object"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseDuty {
    /// Nothing: the object stays open, or somebody else closes (or closed) it.
    Nothing,
    /// This caller cleared the must-close flag: it, and nobody else, must close the object now.
    RunClose,
}

/// Why [`Teardown::enter`] refused a user.
#[must_use = "a refusal may carry the duty to close"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// This user is already inside (its running bit was set); nothing changed.
    AlreadyEntered,
    /// The object is being deleted. The duty says whether this caller must run the close
    /// (its brief presence may have made it the last one out).
    Closing(CloseDuty),
}

/// Misuse of a [`Teardown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeardownError {
    /// A user id `>= MAX_USERS`.
    BadUser {
        /// The offending id.
        id: u8,
    },
    /// [`Teardown::leave`] by a user that is not inside; nothing changed.
    NotEntered {
        /// The user.
        user: UserId,
    },
}

impl fmt::Display for TeardownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadUser { id } => write!(f, "user id {id} out of range (max {MAX_USERS})"),
            Self::NotEntered { user } => write!(f, "user {} is not inside", user.0),
        }
    }
}

/// Who is using a shared object, and whether it must be closed; one atomic word.
///
/// Protocol: users bracket their use with [`enter`](Self::enter) / [`leave`](Self::leave); the
/// deleter calls [`request_close`](Self::request_close) once. Every one of these returns a
/// [`CloseDuty`]; exactly one call over the object's life returns [`CloseDuty::RunClose`], and
/// only after every user that entered successfully has left. No operation loops or blocks.
#[derive(Debug)]
pub struct Teardown {
    state: AtomicU32,
}

impl Teardown {
    /// An open object with no users.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            state: AtomicU32::new(0),
        }
    }

    /// An open object with no users (loom build: not `const`).
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            state: AtomicU32::new(0),
        }
    }

    /// Marks `user` as using the object.
    ///
    /// # Errors
    /// [`Refused::Closing`] once a close was requested (the caller must not touch the object,
    /// but must honour the duty), [`Refused::AlreadyEntered`] if `user` is already inside.
    pub fn enter(&self, user: UserId) -> Result<(), Refused> {
        let bit = user.bit();
        let prev = self.state.fetch_or(bit, Ordering::AcqRel);
        if prev & bit != 0 {
            return Err(Refused::AlreadyEntered);
        }
        if prev & DELETED != 0 {
            // Back out. Our bit was visible for a moment, so we may now be the last one out.
            // Our bit is set (we just set it), so `drop_bit` finds it.
            let duty = self.drop_bit(bit).unwrap_or(CloseDuty::Nothing);
            return Err(Refused::Closing(duty));
        }
        Ok(())
    }

    /// Marks `user` as done with the object.
    ///
    /// # Errors
    /// [`TeardownError::NotEntered`] if `user` was not inside (nothing changes).
    pub fn leave(&self, user: UserId) -> Result<CloseDuty, TeardownError> {
        self.drop_bit(user.bit())
            .ok_or(TeardownError::NotEntered { user })
    }

    /// Asks for the object to be closed: refuses new users from now on. Returns
    /// [`CloseDuty::RunClose`] if nobody is inside (the caller closes), otherwise the last user
    /// to leave gets it. Calling it again is harmless ([`CloseDuty::Nothing`]).
    pub fn request_close(&self) -> CloseDuty {
        let prev = self.state.fetch_or(DELETED, Ordering::AcqRel);
        if prev & DELETED != 0 {
            return CloseDuty::Nothing;
        }
        // Only the unique first requester gets here, so MUST_CLOSE is set at most once ever.
        let prev = self.state.fetch_or(MUST_CLOSE, Ordering::AcqRel);
        if prev & RUNNING == 0 {
            self.claim()
        } else {
            CloseDuty::Nothing
        }
    }

    /// The users currently inside, one bit per [`UserId`] (a snapshot).
    pub fn running_mask(&self) -> u32 {
        self.state.load(Ordering::Acquire) & RUNNING
    }

    /// How many users are inside (a snapshot).
    pub fn users(&self) -> u32 {
        self.running_mask().count_ones()
    }

    /// Whether a close was requested.
    pub fn is_close_requested(&self) -> bool {
        self.state.load(Ordering::Acquire) & DELETED != 0
    }

    /// Whether the close duty was already handed to someone.
    pub fn is_close_claimed(&self) -> bool {
        self.state.load(Ordering::Acquire) & (DELETED | MUST_CLOSE) == DELETED
    }

    /// Clears our running bit; if that emptied the running set while a close is pending, try
    /// to take the close.
    /// `None` if the bit was not set (then nothing changed).
    fn drop_bit(&self, bit: u32) -> Option<CloseDuty> {
        let prev = self.state.fetch_and(!bit, Ordering::AcqRel);
        if prev & bit == 0 {
            None
        } else if prev & RUNNING == bit && prev & MUST_CLOSE != 0 {
            Some(self.claim())
        } else {
            Some(CloseDuty::Nothing)
        }
    }

    /// The only place the close is decided: whoever clears MUST_CLOSE closes.
    fn claim(&self) -> CloseDuty {
        let prev = self.state.fetch_and(!MUST_CLOSE, Ordering::AcqRel);
        if prev & MUST_CLOSE != 0 {
            CloseDuty::RunClose
        } else {
            CloseDuty::Nothing
        }
    }
}

impl Default for Teardown {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn u(i: u8) -> UserId {
        UserId::new(i).unwrap()
    }

    #[test]
    fn closes_once_when_last_user_leaves() {
        let t = Teardown::new();
        t.enter(u(0)).unwrap();
        t.enter(u(1)).unwrap();
        assert_eq!(t.users(), 2);
        assert_eq!(t.request_close(), CloseDuty::Nothing);
        assert_eq!(t.enter(u(2)), Err(Refused::Closing(CloseDuty::Nothing)));
        assert_eq!(t.leave(u(0)), Ok(CloseDuty::Nothing));
        assert!(!t.is_close_claimed());
        assert_eq!(t.leave(u(1)), Ok(CloseDuty::RunClose));
        assert!(t.is_close_claimed());
        assert_eq!(t.request_close(), CloseDuty::Nothing);
        assert_eq!(t.enter(u(1)), Err(Refused::Closing(CloseDuty::Nothing)));
    }

    #[test]
    fn idle_object_is_closed_by_the_deleter() {
        let t = Teardown::new();
        assert_eq!(t.request_close(), CloseDuty::RunClose);
        assert_eq!(t.request_close(), CloseDuty::Nothing);
    }

    #[test]
    fn misuse_is_a_typed_error() {
        let t = Teardown::new();
        assert_eq!(
            UserId::new(MAX_USERS),
            Err(TeardownError::BadUser { id: 30 })
        );
        assert_eq!(t.leave(u(3)), Err(TeardownError::NotEntered { user: u(3) }));
        t.enter(u(3)).unwrap();
        assert_eq!(t.enter(u(3)), Err(Refused::AlreadyEntered));
        assert_eq!(t.running_mask(), 1 << 3);
    }
}
