//! The cpu, disk and net steps for the host-kernel variants (process and crun container),
//! and the parsers of the workloads' output shared with the guest pass.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::container::{Netns, VETH_HOST_IP};
use super::ctx::{progress, Ctx, Prepared};
use super::report::{Better, Figure, Variant};
use super::runner::{field, run, Group, RunError, Watch};
use super::start::{fail_reason, record};

pub const CPU_ROUNDS: u32 = 200;
pub const IPERF_PORT: &str = "5201";
pub const RR_PORT: &str = "5299";
pub const RR_COUNT: &str = "2000";
const TIMEOUT: Duration = Duration::from_secs(120);
/// Size of the file fio reads: large enough that 4 KiB random reads spread out.
const DISK_MIB: usize = 256;

/// fio's terse v3 line: (read KiB/s, read IOPS).
pub fn fio_terse(text: &str) -> Option<(f64, f64)> {
    let line = text.lines().find(|l| l.starts_with("3;"))?;
    let f: Vec<&str> = line.split(';').collect();
    Some((f.get(6)?.parse().ok()?, f.get(7)?.parse().ok()?))
}

/// iperf3 -J: received bits per second of the whole test.
pub fn iperf_bps(json: &str) -> Option<f64> {
    let v: serde_json::Value =
        serde_json::from_str(json.get(json.find('{')?..json.rfind('}')? + 1)?).ok()?;
    v["end"]["sum_received"]["bits_per_second"].as_f64()
}

/// A command run either directly (process) or as the args of a crun container.
fn prepare(
    ctx: &Ctx,
    variant: Variant,
    args: &[&str],
    bind: Option<(&Path, &str)>,
    netns: Option<&str>,
) -> Result<Prepared, String> {
    match variant {
        Variant::Process => {
            let mut cmd = Command::new(args[0]);
            cmd.args(&args[1..]);
            Ok(Prepared {
                cmd,
                _bundle: None,
                any_status: false,
            })
        }
        _ => {
            let inside: Vec<String> = args
                .iter()
                .enumerate()
                .map(|(i, a)| match i {
                    0 => format!(
                        "/bin/{}",
                        Path::new(a)
                            .file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                    ),
                    _ => a.to_string(),
                })
                .collect();
            let inside: Vec<&str> = inside.iter().map(String::as_str).collect();
            ctx.container(&inside, bind, netns)
        }
    }
}

/// A workload's arguments, its read-only bind and the network namespace of its container.
type Setup<'a> = (Vec<String>, Option<(&'a Path, &'a str)>, Option<&'a str>);

/// Runs `args` `ctx.runs` times for process and container; `parse` turns stdout into samples.
fn measure<'a, const N: usize>(
    ctx: &Ctx,
    figs: &mut [Figure; N],
    step: &str,
    setup: &dyn Fn(Variant) -> Result<Setup<'a>, String>,
    parse: &dyn Fn(&str) -> Option<[f64; N]>,
) -> Result<(), RunError> {
    for variant in [Variant::Process, Variant::Container] {
        progress(&format!("{step}: {}", variant.label()));
        let mut samples: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
        let outcome = (0..ctx.runs).try_for_each(|_| {
            let (args, bind, netns) = setup(variant)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut p = prepare(ctx, variant, &args, bind, netns)?;
            let m = run(&mut p.cmd, Watch::new(step, TIMEOUT, "")).map_err(fail_reason)?;
            let values = parse(&m.stdout)
                .ok_or_else(|| format!("{step}: unexpected output: {}", m.stdout.trim()))?;
            samples.iter_mut().zip(values).for_each(|(s, v)| s.push(v));
            Ok(())
        });
        record(figs, variant, outcome, samples)?;
    }
    Ok(())
}

pub fn cpu(ctx: &Ctx) -> Result<[Figure; 1], RunError> {
    let mut figs = [Figure::new(
        "cpu.matmul",
        "cpu: 128×128 matrix multiply",
        "MFLOP/s",
        Better::Higher,
    )];
    let agent = ctx.tools.agent.display().to_string();
    let setup = |_| {
        Ok((
            vec![agent.clone(), "cpu".into(), CPU_ROUNDS.to_string()],
            None,
            None,
        ))
    };
    measure(ctx, &mut figs, "cpu", &setup, &|out| {
        Some([field(out, "mflops=")?])
    })?;
    Ok(figs)
}

/// fio's arguments for one job on `file` (host path or the container's bind).
pub fn fio_args(file: &str, seq: bool) -> Vec<String> {
    let (rw, bs, depth) = if seq {
        ("read", "1M", "4")
    } else {
        ("randread", "4k", "32")
    };
    [
        "--name=bench",
        &format!("--filename={file}"),
        "--readonly",
        "--direct=1",
        "--ioengine=libaio",
        &format!("--rw={rw}"),
        &format!("--bs={bs}"),
        &format!("--iodepth={depth}"),
        "--runtime=2",
        "--time_based",
        "--output-format=terse",
        "--terse-version=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The disk step's file.
pub fn make_disk_file(path: &Path) -> std::io::Result<()> {
    write_random(path, DISK_MIB)
}

/// A file of `mib` MiB of pseudo-random data (not sparse, so that reads hit real blocks).
pub fn write_random(path: &Path, mib: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()
}

pub fn disk(ctx: &Ctx, file: &Path) -> Result<[Figure; 2], RunError> {
    let mut figs = [
        Figure::new(
            "disk.randread",
            "disk: fio 4 KiB random read QD32",
            "kIOPS",
            Better::Higher,
        ),
        Figure::new(
            "disk.seqread",
            "disk: fio 1 MiB sequential read",
            "MiB/s",
            Better::Higher,
        ),
    ];
    let Some(fio) = &ctx.tools.fio else {
        for f in &mut figs {
            f.skipped(Variant::Process, "fio is not installed");
            f.skipped(Variant::Container, "fio is not installed");
        }
        return Ok(figs);
    };
    let host = file.display().to_string();
    let setup = |v: Variant| {
        let target = if v == Variant::Process {
            host.as_str()
        } else {
            "/data/disk.img"
        };
        let mut args = vec![fio.display().to_string()];
        args.extend(fio_args(target, false));
        args.push("--name=seq".into());
        args.extend(fio_args(target, true).into_iter().skip(1));
        args.push("--stonewall".into());
        Ok((args, Some((file, "/data/disk.img")), None))
    };
    let parse = |out: &str| {
        let mut jobs = out.lines().filter(|l| l.starts_with("3;"));
        let (_, iops) = fio_terse(jobs.next()?)?;
        let (kib_s, _) = fio_terse(jobs.next()?)?;
        Some([iops / 1000.0, kib_s / 1024.0])
    };
    measure(ctx, &mut figs, "disk", &setup, &parse)?;
    Ok(figs)
}

/// A background server that lives until dropped.
pub fn server(args: &[&str]) -> Result<Group, RunError> {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let g = Group::spawn(&mut cmd, args[0])?;
    // iperf3 and the agent listen within milliseconds; clients retry connecting anyway.
    std::thread::sleep(Duration::from_millis(300));
    Ok(g)
}

pub fn net(ctx: &Ctx) -> Result<[Figure; 3], RunError> {
    let agent = ctx.tools.agent.display().to_string();
    let _rr = server(&[&agent, "rr-server", RR_PORT])?;
    let _iperf = match &ctx.tools.iperf3 {
        Some(iperf) => Some(server(&[
            &iperf.display().to_string(),
            "-s",
            "-p",
            IPERF_PORT,
        ])?),
        None => None,
    };
    let netns = ctx
        .container_ok()
        .and_then(|()| Netns::create().map_err(|e| rvmm_vmm::error_chain(&e)));
    let peer = |v: Variant| -> Result<(&str, Option<&str>), String> {
        match v {
            Variant::Process => Ok(("127.0.0.1", None)),
            _ => Ok((
                VETH_HOST_IP,
                Some(netns.as_ref().map_err(Clone::clone)?.name.as_str()),
            )),
        }
    };
    // `-R`: the host sends and the client receives.
    let iperf_setup = |v: Variant, reverse: bool| {
        let iperf = ctx.tools.iperf3.as_ref().ok_or("iperf3 is not installed")?;
        let (ip, ns) = peer(v)?;
        let mut args = vec![iperf.display().to_string(), "-c".into(), ip.into()];
        args.extend(["-p", IPERF_PORT, "-t", "2", "-i", "0", "-J"].map(String::from));
        if reverse {
            args.push("-R".into());
        }
        Ok((args, None, ns))
    };
    let rr_setup = |v: Variant| {
        let (ip, ns) = peer(v)?;
        let args = [agent.as_str(), "rr-client", ip, RR_PORT, RR_COUNT];
        Ok((args.iter().map(|s| s.to_string()).collect(), None, ns))
    };
    let mut tcp = [Figure::new(
        "net.tcp",
        "net: TCP throughput (iperf3) to the host",
        "Gbit/s",
        Better::Higher,
    )];
    let bps = |out: &str| Some([iperf_bps(out)? / 1e9]);
    measure(ctx, &mut tcp, "net tcp", &|v| iperf_setup(v, false), &bps)?;
    let mut tcp_rx = [Figure::new(
        "net.tcp_rx",
        "net: TCP throughput (iperf3) from the host",
        "Gbit/s",
        Better::Higher,
    )];
    measure(
        ctx,
        &mut tcp_rx,
        "net tcp from the host",
        &|v| iperf_setup(v, true),
        &bps,
    )?;
    let mut rr = [Figure::new(
        "net.rr",
        "net: TCP 1-byte request/response",
        "µs",
        Better::Lower,
    )];
    measure(ctx, &mut rr, "net rr", &rr_setup, &|out| {
        Some([field(out, "usec=")?])
    })?;
    let ([tcp], [tcp_rx], [rr]) = (tcp, tcp_rx, rr);
    Ok([tcp, tcp_rx, rr])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_fio_and_iperf_output() {
        assert_eq!(
            field("RVMM-BENCH cpu mflops=2449.7 check=5", "mflops="),
            Some(2449.7)
        );
        assert_eq!(field("nothing", "mflops="), None);
        let terse = "3;fio-3.33;bench;0;0;409600;204800;51200;2000;0;0\n";
        assert_eq!(fio_terse(terse), Some((204800.0, 51200.0)));
        let json = "noise {\"end\":{\"sum_received\":{\"bits_per_second\":2.5e9}}}\n";
        assert_eq!(iperf_bps(json), Some(2.5e9));
    }
}
