//! `/echo` (with ECHO_ENDPOINT=true): every message comes back as it was
//! sent, through the same reader, queue and writer as pub/sub, so the
//! WebSocket conformance suite (Autobahn) tests the real connection path.
//! Off by default; it needs no token.

use std::rc::Rc;

use super::endpoint::{Endpoint, LocalFuture, Upgrade};
use crate::engine::message::Encoding;
use crate::session::{Cx, Flow, FrontEnd};
use crate::transport::ws::frame;

/// The echo front-end.
pub struct Echo;

impl Endpoint for Echo {
    fn serves_upgrade(&self, path: &str) -> bool {
        path == "/echo"
    }

    fn upgrade(self: Rc<Self>, up: Upgrade) -> LocalFuture<'static, ()> {
        Box::pin(up.admit(self, ()))
    }
}

impl FrontEnd for Echo {
    /// Echo connections subscribe to nothing.
    const ENCODING: Encoding = super::native::protocol::ENCODING;
    const SHUTDOWN_CODE: u16 = 1001;
    type Conn = ();
    type Admitted = ();
    type Wait = ();

    fn open(&self, _cx: &Cx<'_>, _: ()) {}

    fn on_text(&self, cx: &Cx<'_>, _: &mut (), text: &[u8]) -> Flow<()> {
        cx.worker
            .core
            .shard
            .borrow_mut()
            .push(cx.key, frame::text(text));
        Flow::Continue
    }

    fn on_binary(&self, cx: &Cx<'_>, _: &mut (), data: &[u8]) -> Flow<()> {
        cx.worker
            .core
            .shard
            .borrow_mut()
            .push(cx.key, frame::binary(data));
        Flow::Continue
    }

    fn resume<'a>(
        &'a self,
        _cx: Cx<'a>,
        _conn: &'a mut (),
        _wait: (),
    ) -> impl std::future::Future<Output = ()> + 'a {
        std::future::ready(())
    }

    fn close(&self, _cx: &Cx<'_>, _: &mut ()) {}
}
