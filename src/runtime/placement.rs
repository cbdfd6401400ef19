//! What ONNX Runtime did with a session: which execution provider it gave each node
//! (sessions built with `session.record_ep_graph_assignment_info`), so a GPU run can refuse
//! compute on the CPU, and how much memory its arena held at most.
//!
//! `session.disable_cpu_ep_fallback` cannot do this: it also refuses the small int64 shape
//! computations that ONNX Runtime places on the CPU on purpose (docs/DESIGN.md §6a), which every
//! graph with dynamic latent sizes has.

use std::ffi::{CStr, c_char};
use std::fmt;

use ort::AsPointer;
use ort::memory::{Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;

use crate::error::{Error, Result};

/// One node and the provider it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlacement {
    pub name: String,
    pub op_type: String,
    pub provider: String,
}

impl NodePlacement {
    /// Ops that ONNX Runtime moves to the CPU when they only compute shapes (int64 values
    /// downstream of `Shape`): cheap, and on the CPU by design, not for want of a kernel.
    pub fn is_shape_arithmetic(&self) -> bool {
        const SHAPE_OPS: &[&str] = &[
            "Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Add", "Sub", "Mul", "Div",
            "Min", "Max", "Cast", "Range", "Equal", "Where", "ConstantOfShape", "Identity", "ReduceProd", "Neg", "Abs",
        ];
        SHAPE_OPS.contains(&self.op_type.as_str())
    }
}

impl fmt::Display for NodePlacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.op_type)
    }
}

/// The most memory the session's arena on `device` held in use at once (ONNX Runtime's
/// `MaxInUse`): live tensors, not what the arena reserved. `None` when the session has no
/// arena allocator there (it was disabled, or the device keeps none).
pub fn arena_peak_bytes(session: &Session, device: crate::runtime::Device) -> Result<Option<u64>> {
    let (dev, id) = device.allocation();
    let Ok(info) = MemoryInfo::new(dev, id, AllocatorType::Arena, MemoryType::Default) else { return Ok(None) };
    let Ok(allocator) = Allocator::new(session, info) else { return Ok(None) };
    let api = ort::api();
    let mut stats: *mut ort::sys::OrtKeyValuePairs = std::ptr::null_mut();
    // SAFETY: a live allocator; ONNX Runtime allocates `stats`, released below.
    if check(unsafe { (api.AllocatorGetStats)(allocator.ptr(), &mut stats) }, "reading arena statistics").is_err() || stats.is_null() {
        return Ok(None);
    }
    // SAFETY: `stats` is valid until released; the key is a NUL-terminated literal.
    let peak = unsafe {
        let value = (api.GetKeyValue)(stats, c"MaxInUse".as_ptr());
        let peak = (!value.is_null()).then(|| CStr::from_ptr(value).to_string_lossy().parse::<u64>().ok()).flatten();
        (api.ReleaseKeyValuePairs)(stats);
        peak
    };
    Ok(peak)
}

/// Turns an OrtStatus into a Result, releasing it.
fn check(status: ort::sys::OrtStatusPtr, during: &str) -> Result<()> {
    let ptr = status.0;
    if ptr.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status from the C API; read its message, then release it once.
    let message = unsafe {
        let raw = (ort::api().GetErrorMessage)(ptr);
        let message = CStr::from_ptr(raw).to_string_lossy().into_owned();
        (ort::api().ReleaseStatus)(ptr);
        message
    };
    Err(Error::Device(format!("{during}: {message}")))
}

fn string(getter: impl FnOnce(*mut *const c_char) -> ort::sys::OrtStatusPtr, during: &str) -> Result<String> {
    let mut out: *const c_char = std::ptr::null();
    check(getter(&mut out), during)?;
    if out.is_null() {
        return Ok(String::new());
    }
    // SAFETY: ONNX Runtime returns a NUL-terminated string owned by the session.
    Ok(unsafe { CStr::from_ptr(out) }.to_string_lossy().into_owned())
}

/// Every node of the main graph that ONNX Runtime assigned to its CPU provider.
pub fn cpu_nodes(session: &Session) -> Result<Vec<NodePlacement>> {
    let during = "reading node placement (session.record_ep_graph_assignment_info)";
    let api = ort::api();
    let mut subgraphs: *const *const ort::sys::OrtEpAssignedSubgraph = std::ptr::null();
    let mut count = 0usize;
    // SAFETY: the session outlives this call; the arrays are owned by the session.
    check(unsafe { (api.Session_GetEpGraphAssignmentInfo)(session.ptr(), &mut subgraphs, &mut count) }, during)?;
    let mut placed = Vec::new();
    for i in 0..count {
        // SAFETY: `count` entries; each a valid subgraph pointer.
        let subgraph = unsafe { *subgraphs.add(i) };
        let provider = string(|out| unsafe { (api.EpAssignedSubgraph_GetEpName)(subgraph, out) }, during)?;
        if provider != "CPUExecutionProvider" {
            continue;
        }
        let mut nodes: *const *const ort::sys::OrtEpAssignedNode = std::ptr::null();
        let mut num_nodes = 0usize;
        check(unsafe { (api.EpAssignedSubgraph_GetNodes)(subgraph, &mut nodes, &mut num_nodes) }, during)?;
        for j in 0..num_nodes {
            // SAFETY: `num_nodes` entries; each a valid node pointer.
            let node = unsafe { *nodes.add(j) };
            placed.push(NodePlacement {
                name: string(|out| unsafe { (api.EpAssignedNode_GetName)(node, out) }, during)?,
                op_type: string(|out| unsafe { (api.EpAssignedNode_GetOperatorType)(node, out) }, during)?,
                provider: provider.clone(),
            });
        }
    }
    Ok(placed)
}
