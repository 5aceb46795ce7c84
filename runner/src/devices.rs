//! `--device`: which devices a command trains on. A list names the devices trials run on,
//! one worker (or, with `gpus_per_trial`, one group of ranks) each; the parent process checks
//! GPU numbers against the device count without opening a CUDA context, and only the worker
//! that trains on a device starts it.

use candle_core::Device;

use crate::error::InputError;
use crate::gpu;

/// `--device` as the list of devices to run trials on, one worker each: `cpu`, `cuda`
/// (= cuda:0), `cuda:N`, or a comma-separated list of these where a bare number continues a
/// cuda list (`cuda:0,1,2,3`). A GPU listed twice is refused; `cpu` may repeat (trials side by
/// side on the CPU).
pub fn parse_devices(spec: &str) -> Result<Vec<String>, InputError> {
    let mut devices: Vec<String> = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let after_cuda = devices.last().is_some_and(|d| d.starts_with("cuda"));
        let device = match part {
            "cpu" => "cpu".to_string(),
            "cuda" => "cuda:0".to_string(),
            n if after_cuda && n.parse::<usize>().is_ok() => format!("cuda:{n}"),
            p => p.to_string(),
        };
        if device != "cpu" && devices.contains(&device) {
            return Err(InputError::new(format!(
                "--device {spec}: {device} is listed twice; a GPU runs one trial at a time"
            )));
        }
        devices.push(device);
    }
    let mut gpus = Vec::new();
    for d in &devices {
        if let Some(n) = gpu_ordinal(d, spec)? {
            gpus.push(n);
        }
    }
    if let Some(&n) = gpus.iter().max() {
        if !cfg!(feature = "cuda") {
            return Err(InputError::new(format!(
                "--device {spec}: this build of sweep has no CUDA support; use --device cpu \
                 or build with --features cuda"
            )));
        }
        let count = gpu::count();
        if n >= count {
            return Err(InputError::new(format!(
                "--device {spec}: there is no cuda:{n}: this machine has {count} CUDA \
                 device(s) visible"
            )));
        }
    }
    Ok(devices)
}

/// The devices each trial trains on at once: consecutive runs of `per_trial` devices of the
/// list, each run one slot (a worker and its ranks).
pub fn device_groups(
    devices: &[String],
    per_trial: usize,
    spec: &str,
) -> Result<Vec<String>, InputError> {
    if !devices.len().is_multiple_of(per_trial) {
        return Err(InputError::new(format!(
            "--device {spec}: {} device(s) do not split into groups of train.gpus_per_trial = \
             {per_trial}; list a multiple of {per_trial} devices (e.g. --device cuda:0,1 for 2) \
             or set --gpus-per-trial",
            devices.len()
        )));
    }
    let groups: Vec<&[String]> = devices.chunks(per_trial).collect();
    for g in &groups {
        crate::parallel::one_kind(g, spec)?;
    }
    Ok(groups.iter().map(|g| g.join(",")).collect())
}

/// The GPU number of one device of a `--device` list (`None` for the CPU), without starting
/// it: the parent process keeps off the GPUs, as a CUDA context costs each of them memory.
fn gpu_ordinal(device: &str, spec: &str) -> Result<Option<usize>, InputError> {
    if device == "cpu" {
        return Ok(None);
    }
    let Some(ordinal) = device.strip_prefix("cuda:") else {
        return Err(InputError::new(format!(
            "--device {spec}: unknown device `{device}`; use cpu, cuda, cuda:N or a list \
             such as cuda:0,1"
        )));
    };
    match ordinal.parse::<usize>() {
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(InputError::new(format!(
            "--device {spec}: `{device}` is not cuda:N with N a GPU number"
        ))),
    }
}

/// The device of one entry of a checked device list (`cpu`, `cuda:N`).
pub fn device_of(name: &str) -> Result<Device, InputError> {
    match gpu_ordinal(name, name)? {
        None => Ok(Device::Cpu),
        Some(n) => {
            Device::new_cuda(n).map_err(|e| InputError::new(format!("--device {name}: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &[&str]) -> Vec<String> {
        s.iter().map(|d| d.to_string()).collect()
    }

    #[test]
    fn devices_split_into_consecutive_groups_of_one_kind() {
        let four = list(&["cuda:0", "cuda:1", "cuda:2", "cuda:3"]);
        assert_eq!(
            device_groups(&four, 2, "cuda:0,1,2,3").unwrap(),
            vec!["cuda:0,cuda:1", "cuda:2,cuda:3"]
        );
        assert_eq!(device_groups(&four, 1, "x").unwrap().len(), 4);
        let e = device_groups(&four[..3], 2, "cuda:0,1,2").unwrap_err();
        assert!(e.0.contains("3 device(s) do not split"), "{e}");
        let e = device_groups(&list(&["cpu", "cuda:0"]), 2, "cpu,cuda:0").unwrap_err();
        assert!(e.0.contains("(cpu,cuda:0) are all GPUs or all CPU"), "{e}");
    }
}
