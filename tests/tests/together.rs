//! The "together" arrangement end to end (issue 7, item 8), in the namespaces of
//! `xlb_tests::together`, with real `xlb agent` processes (a front L4 balancer and two gateway
//! hosts), nginx and `xlb decap`: an L4 VIP spreading new connections over two gateway
//! instances (which answer the clients directly) and dropping one whose agent dies; and a
//! gateway route whose upstream is itself an L4 VIP, spread over that VIP's backends and
//! surviving one of them failing. Needs root; run serially.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use xlb_tests::{
    together::{
        Answer, GATEWAYS, HEALTH_FALL, HEALTH_INTERVAL_MS, TogetherTopology, W_PATH_PREFIX,
        get_each_on_a_new_connection,
    },
    topology::VIP_V4,
};

/// How many answers came with each body; panics (showing them) unless every one is a 200.
fn all_ok(what: &str, answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut by_body = BTreeMap::new();
    let failed: Vec<_> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| !matches!(a, Ok((200, _))))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed, e.g. {:?}",
        failed.len(),
        answers.len(),
        &failed[..failed.len().min(5)]
    );
    for (_, body) in answers.iter().flatten() {
        *by_body.entry(body.clone()).or_insert(0) += 1;
    }
    by_body
}

/// Runs `per_client` requests from every client to V:80`path`, each on a new connection,
/// request ids `<tag>-c<i>-<n>`.
fn from_every_client(
    t: &TogetherTopology,
    path: &str,
    tag: &str,
    per_client: usize,
) -> Vec<Answer> {
    let vip = SocketAddr::from((VIP_V4, 80));
    let mut answers = Vec::new();
    for (i, c) in t.base.clients.iter().enumerate() {
        let ids = format!("{tag}-c{i}-");
        answers.extend(get_each_on_a_new_connection(
            &c.ns, vip, path, &ids, per_client,
        ));
    }
    answers
}

/// The access-log lines of gateway `k` for requests whose id starts with `prefix`.
fn access_lines(t: &mut TogetherTopology, k: usize, prefix: &str) -> usize {
    let needle = format!("request_id={prefix}");
    t.gateway_agent(k)
        .lines()
        .iter()
        .filter(|l| l.contains("xlb::access") && l.contains(&needle))
        .count()
}

/// Waits (bounded) for the front agent's `backend down` line about `backend` and returns how
/// long after `since` it came.
fn front_marks_down(t: &mut TogetherTopology, backend: &str, since: Instant) -> Duration {
    let needle = format!("backend={backend}");
    let (line, at) = t
        .front_agent()
        .wait_for_new(&["backend down", &needle], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the front never marked {backend} down"));
    eprintln!("front: {line}");
    at - since
}

/// An L4 VIP (the front's `dsr-ipip` V:80) spreads 200 new connections from two clients over
/// both gateway hosts, each of which strips the IPIP addressed to its tunnel address, serves
/// the request from its own l7 VIP V:80 and answers the client directly; every request is a
/// 200, named by the serving gateway's upstream and logged by that gateway's access log and no
/// other. When one gateway's agent dies, the front's health check (on that agent's metrics
/// endpoint) marks it down within fall x interval (plus a check timeout and slack), and then
/// every new connection goes to the other gateway and succeeds.
#[test]
fn an_l4_vip_spreads_new_connections_over_two_gateways_and_drops_a_dead_one() {
    let started = Instant::now();
    let mut t = TogetherTopology::build(2);
    for k in 0..GATEWAYS {
        t.start_gateway(k);
    }
    t.start_front();

    let answers = from_every_client(&t, "/", "spread", 100);
    let by_body = all_ok("through the front to both gateways", &answers);
    eprintln!("200 new connections: {by_body:?}");
    for k in 0..GATEWAYS {
        let served = by_body.get(&format!("upstream{k}")).copied().unwrap_or(0);
        assert!(
            served >= 50,
            "gateway{k} served {served} of 200 new connections: {by_body:?}"
        );
        // The gateway that named itself is the one that logged the request, and the counts
        // match exactly: no request was served twice or elsewhere.
        assert_eq!(access_lines(&mut t, k, "spread-"), served, "gateway{k}");
    }
    assert_eq!(by_body.len(), GATEWAYS, "{by_body:?}");

    let killed = Instant::now();
    t.kill_gateway(0);
    let gateway0 = t.gateways[0].host.v4.to_string();
    let took = front_marks_down(&mut t, &gateway0, killed);
    let bound = Duration::from_millis(HEALTH_INTERVAL_MS * (HEALTH_FALL + 1) + 250 + 500);
    eprintln!("gateway0 killed; the front marked it down after {took:?} (bound {bound:?})");
    assert!(
        took <= bound,
        "marked down after {took:?}, more than {bound:?}"
    );

    let answers = from_every_client(&t, "/", "after", 100);
    let by_body = all_ok("after gateway0 died", &answers);
    assert_eq!(
        by_body.into_iter().collect::<Vec<_>>(),
        [("upstream1".to_string(), 200)],
        "every new connection goes to the surviving gateway"
    );
    assert_eq!(access_lines(&mut t, 1, "after-"), 200);
    eprintln!("took {:?} in all", started.elapsed());
}

/// A gateway route whose upstream is an L4 VIP (W:8080 on the front, `dsr-ipip` over two
/// backends behind `xlb decap`, whose nginx closes each connection after one response): every
/// request through the gateways (client -> front -> a gateway -> new TCP connection to W ->
/// front -> IPIP to a backend -> the backend answers the gateway directly) is a 200, and the
/// L4 balancer spreads the gateways' connections over both backends. When one backend's nginx
/// stops, the front's health check marks it down, and every request through the gateways is
/// still a 200, answered by the other backend.
#[test]
fn a_gateway_route_to_an_l4_vip_spreads_over_its_backends_and_survives_one_failing() {
    let started = Instant::now();
    let mut t = TogetherTopology::build(1);
    for k in 0..GATEWAYS {
        t.start_gateway(k);
    }
    t.start_front();
    let path = format!("{W_PATH_PREFIX}/item");

    let answers = from_every_client(&t, &path, "w", 80);
    let by_body = all_ok("through a gateway to the L4 VIP W", &answers);
    eprintln!("80 requests to W through the gateways: {by_body:?}");
    for j in 0..t.base.backends.len() {
        let served = by_body.get(&format!("backend{j}")).copied().unwrap_or(0);
        assert!(
            served >= 15,
            "backend{j} answered {served} of 80: {by_body:?}"
        );
    }
    assert_eq!(by_body.len(), 2, "{by_body:?}");
    // Both gateways took part (the front spreads the clients' connections over them) and each
    // routed its requests to the pool whose server is W.
    for k in 0..GATEWAYS {
        let lines = t
            .gateway_agent(k)
            .lines()
            .iter()
            .filter(|l| l.contains("xlb::access") && l.contains("request_id=w-"))
            .cloned()
            .collect::<Vec<_>>();
        assert!(!lines.is_empty(), "gateway{k} served none of them");
        for l in &lines {
            assert!(
                l.contains("route=to-w") && l.contains("upstream=203.0.113.20:8080"),
                "{l}"
            );
        }
    }

    let stopped = Instant::now();
    t.w_servers[0].stop();
    let backend0 = t.base.backends[0].v4.to_string();
    let took = front_marks_down(&mut t, &backend0, stopped);
    eprintln!("backend0's nginx stopped; the front marked it down after {took:?}");

    let answers = from_every_client(&t, &path, "w-after", 80);
    let by_body = all_ok("through a gateway to W after backend0 failed", &answers);
    assert_eq!(
        by_body.into_iter().collect::<Vec<_>>(),
        [("backend1".to_string(), 80)],
        "every request is answered by the surviving backend"
    );
    eprintln!("took {:?} in all", started.elapsed());
}
