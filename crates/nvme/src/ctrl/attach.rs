//! Namespace Attachment (admin opcode 0x15) and the controller lists of Identify (CNS 0x12,
//! 0x13): attach a namespace of the NVM subsystem to controllers, or detach it, and ask which
//! controllers a namespace is attached to.
//!
//! Attaching or detaching does not change [`Controller::namespaces`] by itself: the
//! controller answers with a namespace-attribute notice and fills the Changed Namespace List,
//! and [`Controller::poll_events`] (on the core that owns the controller) reads the list and
//! identifies the namespaces again. A queue pair keeps the list it was created with until
//! [`Controller::refresh_namespaces`] gives it the new one.

use heapless::Vec;
use keel_hal::{Clock, Mmio};

use super::Controller;
use crate::error::{BadIdentify, NvmeError};
use crate::qpair::IoQueuePair;
use crate::spec::{admin_op, sct, PAGE_SIZE};

/// Controller IDs one controller list holds at most (NVMe: 2047 after the count).
pub const MAX_CONTROLLER_IDS: usize = 2047;

/// Identify CNS: controllers attached to the namespace (from CDW10 CNTID up).
const CNS_NS_ATTACHED_CONTROLLERS: u32 = 0x12;
/// Identify CNS: every controller of the NVM subsystem (from CDW10 CNTID up).
const CNS_SUBSYSTEM_CONTROLLERS: u32 = 0x13;

/// Why the controller refused a Namespace Attachment (its status, typed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AttachError {
    /// The namespace is already attached to a controller of the list (SCT 1, SC 0x18).
    AlreadyAttached,
    /// The namespace is private and attached to another controller (SCT 1, SC 0x19).
    Private,
    /// The namespace is not attached to a controller of the list (SCT 1, SC 0x1A).
    NotAttached,
    /// The controller list is empty or names a controller the subsystem does not have
    /// (SCT 1, SC 0x1C).
    ControllerList,
    /// No such namespace in the subsystem (Invalid Namespace or Format, or Invalid Field).
    NoSuchNamespace,
}

impl AttachError {
    /// The typed reason behind a refused Namespace Attachment, if the status is one.
    fn from_status(status: crate::spec::Status) -> Option<Self> {
        Some(match (status.sct, status.sc) {
            (sct::COMMAND_SPECIFIC, 0x18) => Self::AlreadyAttached,
            (sct::COMMAND_SPECIFIC, 0x19) => Self::Private,
            (sct::COMMAND_SPECIFIC, 0x1A) => Self::NotAttached,
            (sct::COMMAND_SPECIFIC, 0x1C) => Self::ControllerList,
            (sct::GENERIC, 0x02 | 0x0B) => Self::NoSuchNamespace,
            _ => return None,
        })
    }
}

impl<M: Mmio, C: Clock> Controller<M, C> {
    /// Whether the controller supports Namespace Management and Attachment (OACS bit 3).
    pub fn supports_attachment(&self) -> bool {
        self.info.namespace_attachment
    }

    /// Attaches namespace `nsid` to `controllers` (controller IDs; this one is
    /// `identify().cntlid`). The namespace shows up in [`Controller::namespaces`] once
    /// [`Controller::poll_events`] handles the notice that follows.
    ///
    /// # Errors
    /// [`NvmeError::Attach`] with the controller's reason; `Unsupported` without OACS bit 3;
    /// `InvalidArgument` for an empty list or one longer than [`MAX_CONTROLLER_IDS`].
    pub fn attach_namespace(&mut self, nsid: u32, controllers: &[u16]) -> Result<(), NvmeError> {
        self.namespace_attachment(nsid, controllers, 0)
    }

    /// Detaches namespace `nsid` from `controllers`; see [`Controller::attach_namespace`].
    /// I/O to it on this controller fails from then on (the device refuses it).
    pub fn detach_namespace(&mut self, nsid: u32, controllers: &[u16]) -> Result<(), NvmeError> {
        self.namespace_attachment(nsid, controllers, 1)
    }

    fn namespace_attachment(
        &mut self,
        nsid: u32,
        controllers: &[u16],
        sel: u32,
    ) -> Result<(), NvmeError> {
        if !self.supports_attachment() {
            return Err(NvmeError::Unsupported("namespace attachment"));
        }
        if controllers.is_empty() || controllers.len() > MAX_CONTROLLER_IDS {
            return Err(NvmeError::InvalidArgument("controller list length"));
        }
        if nsid == 0 || nsid == u32::MAX {
            return Err(NvmeError::InvalidArgument("nsid"));
        }
        self.scratch.fill(0, PAGE_SIZE, 0)?;
        self.scratch.write(0, &(controllers.len() as u16))?;
        for (i, id) in controllers.iter().enumerate() {
            self.scratch.write(2 + 2 * i, id)?;
        }
        let mut sqe = crate::spec::SqEntry::new(admin_op::NS_ATTACHMENT, 0, nsid);
        sqe.prp1 = self.scratch.bus_addr();
        sqe.cdw10 = sel;
        match self.admin_command(sqe) {
            Ok(_) => {
                keel_log::info!(
                    "nvme: ns {} {=str} {=usize} controllers",
                    nsid,
                    if sel == 0 {
                        "attached to"
                    } else {
                        "detached from"
                    },
                    controllers.len()
                );
                Ok(())
            }
            Err(NvmeError::AdminStatus { opcode, status }) => {
                Err(match AttachError::from_status(status) {
                    Some(e) => NvmeError::Attach(e),
                    None => NvmeError::AdminStatus { opcode, status },
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The controllers namespace `nsid` is attached to (Identify CNS 0x12), in increasing
    /// order; at most `N` are kept.
    ///
    /// # Errors
    /// `BadIdentify(ControllerList)` when the list is absurd (a count past what the page
    /// holds, IDs not increasing); a refused Identify as [`NvmeError::Attach`]
    /// (`NoSuchNamespace`) or `AdminStatus`.
    pub fn attached_controllers<const N: usize>(
        &mut self,
        nsid: u32,
        out: &mut Vec<u16, N>,
    ) -> Result<(), NvmeError> {
        self.controller_list(CNS_NS_ATTACHED_CONTROLLERS, nsid, out)
    }

    /// Every controller of the NVM subsystem (Identify CNS 0x13); as
    /// [`Controller::attached_controllers`].
    pub fn subsystem_controllers<const N: usize>(
        &mut self,
        out: &mut Vec<u16, N>,
    ) -> Result<(), NvmeError> {
        self.controller_list(CNS_SUBSYSTEM_CONTROLLERS, 0, out)
    }

    fn controller_list<const N: usize>(
        &mut self,
        cns: u32,
        nsid: u32,
        out: &mut Vec<u16, N>,
    ) -> Result<(), NvmeError> {
        out.clear();
        match self.identify_raw(cns, nsid) {
            Ok(()) => {}
            Err(NvmeError::AdminStatus { opcode, status }) => {
                return Err(match AttachError::from_status(status) {
                    Some(AttachError::NoSuchNamespace) if cns == CNS_NS_ATTACHED_CONTROLLERS => {
                        NvmeError::Attach(AttachError::NoSuchNamespace)
                    }
                    _ => NvmeError::AdminStatus { opcode, status },
                })
            }
            Err(e) => return Err(e),
        }
        let count: u16 = self.scratch.read(0)?;
        if count as usize > MAX_CONTROLLER_IDS {
            return Err(NvmeError::BadIdentify(BadIdentify::ControllerList));
        }
        let mut prev: Option<u16> = None;
        for i in 0..count as usize {
            let id: u16 = self.scratch.read(2 + 2 * i)?;
            if prev.is_some_and(|p| id <= p) {
                return Err(NvmeError::BadIdentify(BadIdentify::ControllerList));
            }
            prev = Some(id);
            let _ = out.push(id);
        }
        Ok(())
    }

    /// Gives `qp` the controller's namespace list as it is now (after a rescan): I/O to a
    /// namespace added since is taken, I/O to one removed since is refused by the driver
    /// (`SubmitError::InvalidNamespace`) instead of by the device. Commands in flight keep
    /// what they were submitted with. Call it on the core that owns `qp`.
    pub fn refresh_namespaces(&self, qp: &mut IoQueuePair<M, C>) {
        qp.set_namespaces(&self.namespaces);
    }
}
