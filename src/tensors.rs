//! Small helpers over a model's variables shared by replication and checkpoints.

use tch::{Device, Kind, Tensor};

/// Variables by name.
pub type Named = Vec<(String, Tensor)>;

/// Every variable of the store (parameters and buffers), sorted by name.
pub fn sorted_variables(vs: &tch::nn::VarStore) -> Named {
    let mut named: Named = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The BatchNorm running statistics (float buffers) and step counts (integer buffers), each
/// sorted by name.
pub fn bn_buffers(vs: &tch::nn::VarStore) -> (Named, Named) {
    sorted_variables(vs)
        .into_iter()
        .filter(|(_, t)| !t.requires_grad())
        .partition(|(_, t)| t.kind() == Kind::Float)
}

/// The tensor's elements as bytes in memory order, copied to the host.
pub fn host_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(Device::Cpu).contiguous();
    let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut bytes, t.numel());
    bytes
}
