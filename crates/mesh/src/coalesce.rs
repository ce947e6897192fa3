//! Writes of one HTTP/2 connection gathered into fewer TLS records and socket writes.
//!
//! hyper's HTTP/2 connection task writes and flushes as soon as one call has something to
//! send, and the runtime polls it right after the call that woke it. With sixteen calls in
//! flight on one internal connection, that was sixteen TLS records and sixteen `writev`s (each
//! a trip through the kernel's loopback, receive side included) where one would carry them
//! all. [`Coalesce`] holds a flush back once: the connection task goes to the back of the
//! runtime's queue, the other calls that are ready run and add their frames, and the next
//! flush sends everything at once. With nothing else ready the task runs again at once, so a
//! lone call waits for no timer, only for one more poll.

use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Past this many bytes held, writes go through without waiting for a flush.
const MAX_HELD: usize = 64 * 1024;

/// After this many yields in a row that gathered nothing more (a connection with one call at a
/// time), flushes go straight through...
const GIVE_UP_AFTER: u32 = 4;

/// ...except every this many-th, which yields again to see whether calls now come together. A
/// yield costs the connection task one more poll, which a lone call pays for nothing: at a
/// fixed 2000 calls/s, one at a time, scenario A's full stack cost 13 µs more per call with
/// every flush yielding.
const PROBE_EVERY: u32 = 16;

/// An I/O stream whose writes are held until a flush, and whose first flush after a write
/// yields to the runtime once before it goes through.
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    held: Vec<u8>,
    /// How much of `held` the inner stream has taken.
    sent: usize,
    /// Whether a flush has already yielded for what is held.
    yielded: bool,
    /// How much was held when it yielded.
    held_at_yield: usize,
    /// Yields in a row that gathered nothing more.
    fruitless: u32,
    /// Flushes sent straight through since the last yield, once yields were given up.
    skipped: u32,
    /// Off: every write goes straight through.
    on: bool,
}

impl<T> Coalesce<T> {
    /// Holds writes until a flush, and yields once before the flush goes through.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            held: Vec::new(),
            sent: 0,
            yielded: false,
            held_at_yield: 0,
            fruitless: 0,
            skipped: 0,
            on: true,
        }
    }

    /// A stream that writes straight through (one type for streams both ways).
    pub fn off(inner: T) -> Self {
        Self {
            on: false,
            ..Self::new(inner)
        }
    }

    /// The stream written to.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T> Coalesce<T> {
    /// Whether this flush yields first: always, until yields stop gathering anything.
    fn should_yield(&mut self) -> bool {
        if self.fruitless < GIVE_UP_AFTER {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= PROBE_EVERY {
            self.skipped = 0;
            return true;
        }
        false
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out everything held.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        // A large burst must not keep its buffer for the life of the connection.
        if self.held.capacity() > MAX_HELD {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.on {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if this.held.len() + buf.len() > MAX_HELD {
            ready!(this.poll_send_held(cx))?;
            if buf.len() >= MAX_HELD {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.on {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if this.held.len() + len > MAX_HELD {
            ready!(this.poll_send_held(cx))?;
            if len >= MAX_HELD {
                return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
            }
        }
        for buf in bufs {
            this.held.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        self.on || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.held.is_empty() {
            this.yielded = false;
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if this.yielded {
            // Back after the yield: h2 wrote what the other calls queued meanwhile, if any.
            if this.held.len() > this.held_at_yield {
                this.fruitless = 0;
            } else {
                this.fruitless = this.fruitless.saturating_add(1);
            }
            // Counted once, even if the socket makes this flush wait.
            this.yielded = false;
        } else if this.should_yield() {
            // Woken while it runs, the task is queued behind the tasks already ready (tokio
            // treats it as a yield), which is the point.
            this.yielded = true;
            this.held_at_yield = this.held.len();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
    };

    use super::*;

    /// An inner stream that records each write it is given.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
        /// A peer that reads nothing: every write waits.
        stalled: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.stalled {
                return Poll::Pending;
            }
            self.get_mut().writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn write(io: &mut Coalesce<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        let n = Pin::new(io).poll_write(cx, bytes);
        assert!(matches!(n, Poll::Ready(Ok(n)) if n == bytes.len()));
    }

    #[test]
    fn writes_wait_for_a_flush_that_yields_once_then_go_in_one_write() {
        let wakes = Arc::new(Wakes::default());
        let waker = wakes.clone().into();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::new(Recorder::default());

        write(&mut io, &mut cx, b"one ");
        write(&mut io, &mut cx, b"two ");
        assert!(io.get_ref().writes.is_empty(), "held until a flush");

        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the task is woken to come back"
        );
        assert!(io.get_ref().writes.is_empty());

        // What the other calls add meanwhile goes with it.
        let bufs = [IoSlice::new(b"three "), IoSlice::new(b"four")];
        assert!(matches!(
            Pin::new(&mut io).poll_write_vectored(&mut cx, &bufs),
            Poll::Ready(Ok(10))
        ));
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.get_ref().writes, vec![b"one two three four".to_vec()]);
        assert_eq!(io.get_ref().flushes, 1);

        // The next round yields again; a flush with nothing held does not.
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        write(&mut io, &mut cx, b"five");
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(io.get_ref().writes.len(), 2);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_connection_whose_yields_gather_nothing_yields_only_now_and_then() {
        let wakes = Arc::new(Wakes::default());
        let waker = wakes.clone().into();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::new(Recorder::default());
        // One call at a time: every yield comes back with nothing more.
        fn lone_call(io: &mut Coalesce<Recorder>, cx: &mut Context<'_>) -> u32 {
            write(io, cx, b"call");
            let mut polls = 1;
            while Pin::new(&mut *io).poll_flush(cx).is_pending() {
                polls += 1;
            }
            polls
        }
        for _ in 0..GIVE_UP_AFTER {
            assert_eq!(
                lone_call(&mut io, &mut cx),
                2,
                "yields while yields may gather"
            );
        }
        let polls: Vec<u32> = (0..2 * PROBE_EVERY)
            .map(|_| lone_call(&mut io, &mut cx))
            .collect();
        let yields = polls.iter().filter(|&&p| p == 2).count();
        assert_eq!(yields, 2, "one probe in every {PROBE_EVERY}: {polls:?}");
        assert_eq!(
            io.get_ref().writes.len() as u32,
            GIVE_UP_AFTER + 2 * PROBE_EVERY,
            "every call's bytes went out"
        );

        // Calls come together again: the probe gathers, and yields resume.
        while {
            write(&mut io, &mut cx, b"a");
            let pending = Pin::new(&mut io).poll_flush(&mut cx).is_pending();
            if pending {
                write(&mut io, &mut cx, b"b");
            }
            assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
            !pending
        } {}
        assert_eq!(
            lone_call(&mut io, &mut cx),
            2,
            "yields again after one gathered"
        );
        assert_eq!(
            wakes.0.load(Ordering::Relaxed) as u32,
            GIVE_UP_AFTER + 2 + 1 + 1
        );
    }

    #[test]
    fn a_large_write_goes_through_after_what_is_held() {
        let waker = Arc::new(Wakes::default()).into();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::new(Recorder::default());
        write(&mut io, &mut cx, b"head");
        let big = vec![7u8; MAX_HELD + 1];
        write(&mut io, &mut cx, &big);
        assert_eq!(io.get_ref().writes, vec![b"head".to_vec(), big]);
    }

    #[test]
    fn a_peer_that_reads_nothing_holds_back_the_writer_not_memory() {
        let waker = Arc::new(Wakes::default()).into();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::new(Recorder {
            stalled: true,
            ..Recorder::default()
        });
        let frame = [1u8; 1000];
        let mut taken = 0;
        for _ in 0..1000 {
            match Pin::new(&mut io).poll_write(&mut cx, &frame) {
                Poll::Ready(Ok(n)) => taken += n,
                Poll::Pending => break,
                Poll::Ready(Err(err)) => panic!("{err}"),
            }
        }
        assert!(
            taken <= MAX_HELD,
            "held {taken} bytes for a peer that reads nothing"
        );
        assert!(
            taken + frame.len() > MAX_HELD,
            "pending before the cap: {taken}"
        );
        assert!(Pin::new(&mut io).poll_write(&mut cx, &frame).is_pending());

        // Once the peer reads again, what was held goes first, then the rest.
        io.inner.stalled = false;
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, &frame),
            Poll::Ready(Ok(1000))
        ));
        assert_eq!(io.get_ref().writes.concat().len(), taken);
    }

    #[test]
    fn shutdown_sends_what_is_held_first() {
        let waker = Arc::new(Wakes::default()).into();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::new(Recorder::default());
        write(&mut io, &mut cx, b"goaway");
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_ready());
        assert_eq!(io.get_ref().writes, vec![b"goaway".to_vec()]);
        assert!(io.get_ref().shut);
    }

    #[test]
    fn off_writes_straight_through() {
        let wakes = Arc::new(Wakes::default());
        let waker = wakes.clone().into();
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesce::off(Recorder::default());
        write(&mut io, &mut cx, b"now");
        assert_eq!(io.get_ref().writes, vec![b"now".to_vec()]);
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
    }
}
