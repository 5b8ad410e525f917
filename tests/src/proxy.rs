//! TCP proxies between cluster members, to cut one member off the others: each proxy
//! stands in front of one member (the members advertise the proxies' addresses to each
//! other), and while a member is cut off, what it sends and what is sent to it through the
//! proxies is dropped — read and thrown away, never answered — as a network partition
//! does. The sender of a connection is named by its first request's `kairos-node` header
//! (every request between members carries it).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a waiting proxy thread looks at the cut and the stop flag.
const POLL: Duration = Duration::from_millis(25);

#[derive(Default)]
struct State {
    /// Members cut off.
    cut: Mutex<BTreeSet<u64>>,
    /// Members whose answers are replaced by garbage (a well-formed HTTP answer whose body
    /// is not what was asked for).
    garbled: Mutex<BTreeSet<u64>>,
    /// Members whose answers are held this long, per chunk.
    slow: Mutex<std::collections::BTreeMap<u64, Duration>>,
    stop: AtomicBool,
}

impl State {
    fn blocked(&self, sender: Option<u64>, target: u64) -> bool {
        let cut = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        cut.contains(&target) || sender.is_some_and(|sender| cut.contains(&sender))
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn garbled(&self, member: u64) -> bool {
        self.garbled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&member)
    }

    fn delay(&self, member: u64) -> Option<Duration> {
        self.slow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&member)
            .copied()
    }
}

/// One proxy per member, member `i` (from 1) behind `urls[i - 1]`.
pub struct PartitionProxy {
    pub urls: Vec<String>,
    state: Arc<State>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl PartitionProxy {
    /// Proxies on free loopback ports, member `i` (from 1) forwarded to `targets[i - 1]`.
    pub fn start(targets: &[SocketAddr]) -> PartitionProxy {
        let state = Arc::new(State::default());
        let mut urls = Vec::new();
        let mut threads = Vec::new();
        for (index, target) in targets.iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").expect("a proxy port");
            listener.set_nonblocking(true).unwrap();
            urls.push(format!("http://{}", listener.local_addr().unwrap()));
            let (state, target, member) = (state.clone(), *target, index as u64 + 1);
            threads.push(std::thread::spawn(move || {
                while !state.stopped() {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let state = state.clone();
                            std::thread::spawn(move || relay(client, target, member, &state));
                        }
                        // Nothing waiting (or a failed accept): look again shortly.
                        Err(_) => std::thread::sleep(POLL),
                    }
                }
            }));
        }
        PartitionProxy {
            urls,
            state,
            threads,
        }
    }

    /// Cuts `member` off: nothing it sends reaches the others, nothing they send reaches it.
    pub fn cut_off(&self, member: u64) {
        self.state
            .cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member);
    }

    /// Makes every answer of `member` garbage (to what the others send it).
    pub fn garble(&self, member: u64) {
        self.state
            .garbled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member);
    }

    /// Holds every chunk `member` answers for `delay`.
    pub fn slow_down(&self, member: u64, delay: Duration) {
        self.state
            .slow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(member, delay);
    }

    /// Ends every cut, garbling and slowing.
    pub fn heal(&self) {
        self.state
            .cut
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.state
            .garbled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.state
            .slow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Drop for PartitionProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Relays one connection to `target` (member `member`), dropping what a cut blocks. A
/// connection that lost bytes to a cut is not trusted again (an HTTP request cut in two):
/// it is closed once the cut heals, and the member's client opens a new one.
fn relay(mut client: TcpStream, target: SocketAddr, member: u64, state: &Arc<State>) {
    let _ = client.set_read_timeout(Some(POLL));
    // The first request's head names the sender.
    let mut head = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if state.stopped() {
                    return;
                }
            }
            Err(_) => return,
        }
        if head.len() > 1 << 20 {
            return;
        }
    }
    let sender = String::from_utf8_lossy(&head).lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("kairos-node")
            .then(|| value.trim().parse::<u64>().ok())
            .flatten()
    });
    if state.garbled(member) {
        // Answered at once, without the member: valid HTTP, a body that is not.
        let _ = client.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\nconnection: close\r\n\r\n{\"garbage\": ]",
        );
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let poisoned = Arc::new(AtomicBool::new(false));
    let upstream = if state.blocked(sender, member) {
        poisoned.store(true, Ordering::Relaxed);
        None
    } else {
        TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok()
    };
    let Some(mut upstream) = upstream else {
        // Cut off (or the member is down): swallow what comes until the cut heals or the
        // client gives up, then close.
        drain(&mut client, sender, member, state);
        return;
    };
    if upstream.write_all(&head).is_err() {
        return;
    }
    let _ = upstream.set_read_timeout(Some(POLL));
    let (back_from, back_to) = (upstream.try_clone().unwrap(), client.try_clone().unwrap());
    let (back_state, back_poisoned) = (state.clone(), poisoned.clone());
    let backward = std::thread::spawn(move || {
        pump(
            back_from,
            back_to,
            sender,
            member,
            &back_state,
            &back_poisoned,
            true,
        );
    });
    pump(client, upstream, sender, member, state, &poisoned, false);
    let _ = backward.join();
}

/// Copies `from` to `to` until either side closes; bytes a cut blocks are dropped, and
/// the member's answers (`answers`) are held while it is slowed down.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    sender: Option<u64>,
    member: u64,
    state: &State,
    poisoned: &AtomicBool,
    answers: bool,
) {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if state.stopped() || (poisoned.load(Ordering::Relaxed) && !state.blocked(sender, member)) {
            break;
        }
        match from.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                if answers && let Some(delay) = state.delay(member) {
                    std::thread::sleep(delay);
                }
                if state.blocked(sender, member) {
                    poisoned.store(true, Ordering::Relaxed);
                } else if to.write_all(&chunk[..n]).is_err() {
                    break;
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// Reads and drops what `client` sends while the cut lasts; closes it after.
fn drain(client: &mut TcpStream, sender: Option<u64>, member: u64, state: &State) {
    let mut chunk = [0u8; 16 * 1024];
    while state.blocked(sender, member) && !state.stopped() {
        match client.read(&mut chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = client.shutdown(Shutdown::Both);
}
