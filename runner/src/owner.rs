//! Which process runs a trial, and whether that process is still alive: `sweep run`s on one
//! results DB take trials by writing their owner into it, and take over a trial whose owner
//! has died (a killed or pre-empted run).

/// A process on another host is taken for dead when its trial's heartbeat (written at every
/// evaluation) is older than this, in seconds.
const STALE_S: f64 = 30.0 * 60.0;

/// `host:pid:start`, start being the process's start time in clock ticks since boot, so that
/// a reused pid is not mistaken for the same process.
pub fn me() -> String {
    let pid = std::process::id();
    format!("{}:{pid}:{}", host(), start_time(pid).unwrap_or(0))
}

/// Whether the owner recorded for a trial has died. On this host the process table says;
/// elsewhere a stale heartbeat does (its age in seconds, as the results store computes it).
pub fn dead(owner: &str, heartbeat_age_s: Option<f64>) -> bool {
    let mut parts = owner.rsplitn(3, ':');
    let (Some(start), Some(pid), Some(host_name)) = (parts.next(), parts.next(), parts.next())
    else {
        return true;
    };
    let (Ok(start), Ok(pid)) = (start.parse::<u64>(), pid.parse::<u32>()) else {
        return true;
    };
    if host_name == host() {
        return start_time(pid) != Some(start);
    }
    heartbeat_age_s.is_none_or(|a| a > STALE_S)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "localhost".into())
}

/// Field 22 of /proc/<pid>/stat; `None` when there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its ')' are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_finished_one_is_not() {
        assert!(!dead(&me(), None));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap_or(1);
        child.wait().unwrap();
        assert!(dead(&format!("{}:{pid}:{start}", host()), None));
        // The same pid with another start time is another process.
        let mine = std::process::id();
        assert!(dead(&format!("{}:{mine}:1", host()), None));
        assert!(dead("garbage", None));
    }

    #[test]
    fn other_hosts_are_judged_by_their_heartbeat() {
        // Ages in seconds, as the store computes them from heartbeat_at.
        assert!(!dead("elsewhere:1:1", Some(5.0)));
        assert!(!dead("elsewhere:1:1", Some(29.0 * 60.0)));
        assert!(dead("elsewhere:1:1", Some(31.0 * 60.0)));
        assert!(dead("elsewhere:1:1", None));
    }
}
