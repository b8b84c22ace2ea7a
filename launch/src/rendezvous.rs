//! The rendezvous that hands NCCL's unique id from rank 0 to every rank, as torchrun's TCP
//! store does: rank 0 creates the 128 bytes, listens on the master port and answers each
//! rank's request; the others connect (retrying while rank 0 starts) and read them. Only the
//! id travels here: the gradients go through NCCL itself.
//!
//! One request: `temper-rendezvous 1`, the rank and the world size (u32, little-endian each).
//! One answer: `ok` and the id, or `no`, a length (u32) and why.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use temper_trainer::CollectiveError;

use crate::topology::Topology;

/// The bytes of NCCL's `ncclUniqueId`.
pub const ID_BYTES: usize = 128;

const MAGIC: &[u8; 20] = b"temper-rendezvous 1\n";

/// How long a rank waits for the others by default: rank 0 for every rank to ask, the others
/// for rank 0 to listen (their processes start at about the same time, but a busy machine or a
/// slow shared file system can take minutes).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

fn failed(message: String) -> CollectiveError {
    CollectiveError::Engine {
        operation: "rendezvous",
        message,
    }
}

/// Rank 0 passes `Some(id)` and serves it to every other rank; the others pass `None` and get
/// rank 0's. Returns the job's id on every rank.
pub fn share_id(
    topology: &Topology,
    id: Option<[u8; ID_BYTES]>,
    timeout: Duration,
) -> Result<[u8; ID_BYTES], CollectiveError> {
    match (topology.rank, id) {
        (0, Some(id)) => serve(topology, id, timeout).map(|()| id),
        (0, None) => unreachable!("rank 0 creates the id"),
        (_, _) => fetch(topology, timeout),
    }
}

fn serve(t: &Topology, id: [u8; ID_BYTES], timeout: Duration) -> Result<(), CollectiveError> {
    if t.world_size == 1 {
        return Ok(());
    }
    let listener = TcpListener::bind(("0.0.0.0", t.master_port))
        .map_err(|e| failed(format!("rank 0 cannot listen on port {}: {e}", t.master_port)))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| failed(format!("port {}: {e}", t.master_port)))?;
    let deadline = Instant::now() + timeout;
    let mut answered = BTreeSet::new();
    while answered.len() < t.world_size - 1 {
        match listener.accept() {
            Ok((stream, _)) => {
                // A stray connection (a port scan, a worker of another job) is answered and
                // forgotten; only well-formed requests count.
                if let Ok(rank) = answer(stream, t, &id, &answered) {
                    answered.insert(rank);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..t.world_size)
                        .filter(|r| !answered.contains(r))
                        .map(|r| r.to_string())
                        .collect();
                    return Err(failed(format!(
                        "rank 0 waited {}s on port {} for ranks {} to ask for NCCL's id; did they start, and can they reach MASTER_ADDR={}?",
                        timeout.as_secs(),
                        t.master_port,
                        missing.join(", "),
                        t.master_addr
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(failed(format!("rank 0 accepting on port {}: {e}", t.master_port))),
        }
    }
    Ok(())
}

/// Reads one request and answers it; the rank served, or why not.
fn answer(
    mut stream: TcpStream,
    t: &Topology,
    id: &[u8; ID_BYTES],
    answered: &BTreeSet<usize>,
) -> Result<usize, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut request = [0u8; MAGIC.len() + 8];
    stream.read_exact(&mut request).map_err(|e| e.to_string())?;
    if &request[..MAGIC.len()] != MAGIC {
        return Err("not a Temper rendezvous request".into());
    }
    let word = |at: usize| u32::from_le_bytes(request[at..at + 4].try_into().unwrap()) as usize;
    let (rank, world) = (word(MAGIC.len()), word(MAGIC.len() + 4));
    let refusal = if world != t.world_size {
        Some(format!(
            "rank {rank} counts {world} workers but rank 0 counts {}: the workers were started with different WORLD_SIZE",
            t.world_size
        ))
    } else if rank == 0 || rank >= world {
        Some(format!(
            "rank {rank} cannot ask rank 0 for the id of a {world}-worker job"
        ))
    } else if answered.contains(&rank) {
        Some(format!("two workers claim rank {rank}"))
    } else {
        None
    };
    match refusal {
        None => {
            stream.write_all(b"ok").map_err(|e| e.to_string())?;
            stream.write_all(id).map_err(|e| e.to_string())?;
            Ok(rank)
        }
        Some(why) => {
            let _ = stream.write_all(b"no");
            let _ = stream.write_all(&(why.len() as u32).to_le_bytes());
            let _ = stream.write_all(why.as_bytes());
            Err(why)
        }
    }
}

fn fetch(t: &Topology, timeout: Duration) -> Result<[u8; ID_BYTES], CollectiveError> {
    let deadline = Instant::now() + timeout;
    let target = format!("{}:{}", t.master_addr, t.master_port);
    let mut last_error;
    loop {
        match connect(&target) {
            Ok(stream) => return request(stream, t),
            Err(e) => last_error = e,
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "rank {} could not reach rank 0 at {target} within {}s ({last_error}); is rank 0 running, and is MASTER_ADDR right?",
                t.rank,
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect(target: &str) -> Result<TcpStream, String> {
    let addrs: Vec<_> = target
        .to_socket_addrs()
        .map_err(|e| format!("resolving {target}: {e}"))?
        .collect();
    let mut last = format!("{target} resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn request(mut stream: TcpStream, t: &Topology) -> Result<[u8; ID_BYTES], CollectiveError> {
    let io = |e: std::io::Error| {
        failed(format!(
            "rank {} asking rank 0 at {}:{} for NCCL's id: {e} (is something else listening on that port?)",
            t.rank, t.master_addr, t.master_port
        ))
    };
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io)?;
    let mut message = MAGIC.to_vec();
    message.extend((t.rank as u32).to_le_bytes());
    message.extend((t.world_size as u32).to_le_bytes());
    stream.write_all(&message).map_err(io)?;
    let mut status = [0u8; 2];
    stream.read_exact(&mut status).map_err(io)?;
    match &status {
        b"ok" => {
            let mut id = [0u8; ID_BYTES];
            stream.read_exact(&mut id).map_err(io)?;
            Ok(id)
        }
        b"no" => {
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).map_err(io)?;
            let mut why = vec![0u8; (u32::from_le_bytes(len) as usize).min(4096)];
            stream.read_exact(&mut why).map_err(io)?;
            Err(failed(format!("rank 0 refused: {}", String::from_utf8_lossy(&why))))
        }
        other => Err(failed(format!(
            "rank {} got {other:?} from {}:{}, not a Temper rendezvous: is another program on that port?",
            t.rank, t.master_addr, t.master_port
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn topology(rank: usize, world: usize, port: u16) -> Topology {
        Topology {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: "test",
            engine: None,
        }
    }

    #[test]
    fn every_rank_gets_rank_zeros_id() {
        let port = free_port();
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 3) as u8);
        // The others start first: they retry until rank 0 listens.
        let others: Vec<_> = (1..4)
            .map(|r| std::thread::spawn(move || share_id(&topology(r, 4, port), None, Duration::from_secs(20))))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            share_id(&topology(0, 4, port), Some(id), Duration::from_secs(20)).unwrap(),
            id
        );
        for o in others {
            assert_eq!(o.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_is_named() {
        let port = free_port();
        let one = std::thread::spawn(move || share_id(&topology(1, 3, port), None, Duration::from_secs(20)));
        let err = share_id(&topology(0, 3, port), Some([1; ID_BYTES]), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ranks 2 to ask"), "{err}");
        assert_eq!(one.join().unwrap().unwrap(), [1; ID_BYTES]);
    }

    #[test]
    fn no_rank_zero_times_out_with_the_address() {
        let port = free_port();
        let err = share_id(&topology(2, 3, port), None, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("rank 2 could not reach rank 0 at 127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[test]
    fn mismatched_world_sizes_and_strangers_are_refused() {
        let port = free_port();
        let zero =
            std::thread::spawn(move || share_id(&topology(0, 2, port), Some([9; ID_BYTES]), Duration::from_secs(2)));
        std::thread::sleep(Duration::from_millis(200));
        // A stranger's bytes do not count as a rank, nor crash rank 0.
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(&[b'x'; 28]).unwrap();
        drop(s);
        let err = share_id(&topology(1, 3, port), None, Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank 1 counts 3 workers but rank 0 counts 2"), "{err}");
        assert_eq!(
            share_id(&topology(1, 2, port), None, Duration::from_secs(2)).unwrap(),
            [9; ID_BYTES]
        );
        zero.join().unwrap().unwrap();
    }

    #[test]
    fn another_program_on_the_port_is_named() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        });
        let err = share_id(&topology(1, 2, port), None, Duration::from_secs(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a Temper rendezvous"), "{err}");
    }
}
