//! Many relays (issue 17): a relay's signed roster makes the nodes that trust it work for the
//! relays it vouches for, one step from what the owner gave, unless the owner pinned the list.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use aimatrix_protocol::identity::Keypair;
use aimatrix_protocol::messages::{seal, JobId, Message, Roster, RosterEntry, ROSTER_RELAYS_MAX};
use aimatrix_protocol::node::{AcceptMode, NodeConfig, NodeCore, NodeEvent, RelayTrust};
use aimatrix_protocol::relay::{RelayConfig, RelayCore, ROSTER_REPUBLISH_MS};
use aimatrix_protocol::time::Millis;
use aimatrix_protocol::{testkit, Topic, Transmit};

const NOW: Millis = 1_000_000;

fn relay(n: u64) -> RelayCore {
    RelayCore::new(testkit::keypair(n), RelayConfig::default(), n)
}

fn node(given: &[&RelayCore], pin: bool) -> NodeCore {
    let cfg = NodeConfig {
        accept: AcceptMode::Auto,
        trusted_relays: given.iter().map(|r| r.id()).collect(),
        pin_relays: pin,
        ..NodeConfig::default()
    };
    NodeCore::new(testkit::keypair(1), cfg, testkit::profile(), 9)
}

fn entry(relay: &RelayCore) -> RosterEntry {
    RosterEntry { relay: relay.id(), addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()] }
}

/// Posts a batch job at `relay` with its reservation confirmed; returns the job and the
/// offer's bytes.
fn post(relay: &mut RelayCore, now: Millis) -> (JobId, Vec<u8>) {
    let job = testkit::post(relay, now, "alice", testkit::batch_spec(10)).unwrap();
    relay.reserve_confirmed(now, job).unwrap();
    (job, broadcast(relay, Topic::Offers).expect("an offer"))
}

/// The last message `relay` broadcast on `topic` (draining everything else).
fn broadcast(relay: &mut RelayCore, topic: Topic) -> Option<Vec<u8>> {
    let mut found = None;
    while let Some(t) = relay.poll_transmit() {
        if let Transmit::Broadcast { topic: t, bytes } = t {
            if t == topic {
                found = Some(bytes);
            }
        }
    }
    found
}

/// Whether `node` sent a claim for `job` to `to`.
fn claimed_at(node: &mut NodeCore, to: &RelayCore) -> bool {
    let mut claimed = false;
    while let Some(t) = node.poll_transmit() {
        if let Transmit::Direct { to: dest, .. } = t {
            claimed |= dest == to.id();
        }
    }
    claimed
}

fn events(node: &mut NodeCore) -> Vec<NodeEvent> {
    std::iter::from_fn(|| node.poll_event()).collect()
}

#[test]
fn a_node_works_for_the_relays_its_relay_vouches_for() {
    let (mut a, mut b, mut c) = (relay(1_000), relay(2_000), relay(3_000));
    let mut n = node(&[&a], false);
    n.handle_timeout(NOW);

    // Before A vouches for B, B's offers are refused and counted.
    let (_, offer) = post(&mut b, NOW);
    n.handle_message(NOW, None, &offer);
    assert_eq!(n.reject_counts().get("untrusted_relay"), Some(&1));
    assert!(!claimed_at(&mut n, &b));

    a.set_roster(NOW, vec![entry(&b)]).unwrap();
    let roster = broadcast(&mut a, Topic::Relays).expect("A publishes its roster");
    n.handle_message(NOW + 1, None, &roster);
    let changed = events(&mut n)
        .into_iter()
        .find_map(|e| match e {
            NodeEvent::RelaysChanged { vouched } => Some(vouched),
            _ => None,
        })
        .expect("the node says which relays it now works for");
    assert_eq!(changed, vec![entry(&b)]);
    let trust = n.relays();
    assert_eq!(trust[0], (a.id(), RelayTrust::Given));
    assert_eq!(
        trust[1],
        (b.id(), RelayTrust::Vouched { by: a.id(), addrs: entry(&b).addrs }),
        "{trust:?}"
    );

    // Now B's offers are taken and claimed from B.
    let (_, offer) = post(&mut b, NOW + 2);
    n.handle_message(NOW + 2, None, &offer);
    assert!(claimed_at(&mut n, &b), "the node claims B's offer from B");

    // C is vouched for by nobody the node was given: its roster extends nothing and is not a
    // refusal (every relay publishes one), its offers are refused.
    c.set_roster(NOW, vec![entry(&c), entry(&a)]).unwrap();
    let c_roster = broadcast(&mut c, Topic::Relays).unwrap();
    let refused_before = n.reject_counts().get("untrusted_relay").copied();
    n.handle_message(NOW + 3, None, &c_roster);
    assert_eq!(n.reject_counts().get("untrusted_relay").copied(), refused_before);
    assert_eq!(n.relays().len(), 2);
    let (_, offer) = post(&mut c, NOW + 3);
    n.handle_message(NOW + 3, None, &offer);
    assert_eq!(n.reject_counts().get("untrusted_relay"), Some(&2));

    // B's own roster does not extend the trust further (one step from what was given).
    b.set_roster(NOW, vec![entry(&c)]).unwrap();
    let b_roster = broadcast(&mut b, Topic::Relays).unwrap();
    n.handle_message(NOW + 4, None, &b_roster);
    assert_eq!(n.relays().len(), 2);

    // An older roster from A changes nothing; a newer one without B withdraws it.
    let old = Message::Roster(Roster { seq: 1, relays: Vec::new() });
    let old = seal(&testkit::keypair(1_000), &old, 77, NOW + 5, 60_000).unwrap();
    n.handle_message(NOW + 5, None, &old);
    assert_eq!(n.relays().len(), 2, "an older roster is ignored");
    let newer = Message::Roster(Roster { seq: u64::MAX, relays: Vec::new() });
    let newer = seal(&testkit::keypair(1_000), &newer, 78, NOW + 6, 60_000).unwrap();
    n.handle_message(NOW + 6, None, &newer);
    assert_eq!(n.relays(), vec![(a.id(), RelayTrust::Given)]);
    assert!(events(&mut n).contains(&NodeEvent::RelaysChanged { vouched: Vec::new() }));
}

#[test]
fn a_pinned_node_works_only_for_the_relays_it_was_given() {
    let (mut a, mut b) = (relay(1_000), relay(2_000));
    let mut n = node(&[&a], true);
    a.set_roster(NOW, vec![entry(&b)]).unwrap();
    let roster = broadcast(&mut a, Topic::Relays).unwrap();
    n.handle_message(NOW, None, &roster);
    assert_eq!(n.relays(), vec![(a.id(), RelayTrust::Given)]);
    let (_, offer) = post(&mut b, NOW);
    n.handle_message(NOW, None, &offer);
    assert_eq!(n.reject_counts().get("untrusted_relay"), Some(&1));
}

#[test]
fn an_oversized_roster_is_refused_by_the_relay_and_by_the_node() {
    let mut a = relay(1_000);
    let many: Vec<RosterEntry> = (0..=ROSTER_RELAYS_MAX as u64)
        .map(|i| RosterEntry {
            relay: Keypair::from_secret_bytes([i as u8; 32]).public(),
            addrs: Vec::new(),
        })
        .collect();
    let err = a.set_roster(NOW, many.clone()).unwrap_err();
    assert!(err.contains("at most 64"), "{err}");
    assert!(broadcast(&mut a, Topic::Relays).is_none());

    let mut n = node(&[&a], false);
    let forged = Message::Roster(Roster { seq: 5, relays: many });
    let forged = seal(&testkit::keypair(1_000), &forged, 5, NOW, 60_000).unwrap();
    n.handle_message(NOW, None, &forged);
    assert_eq!(n.reject_counts().get("bad_roster"), Some(&1));
    assert_eq!(n.relays().len(), 1);
}

#[test]
fn a_relay_publishes_its_roster_again_on_its_timer_and_ignores_others() {
    let (mut a, b) = (relay(1_000), relay(2_000));
    assert_eq!(a.poll_timeout(), None, "no roster, no timer");
    a.set_roster(NOW, vec![entry(&b)]).unwrap();
    assert!(broadcast(&mut a, Topic::Relays).is_some());
    assert_eq!(a.poll_timeout(), Some(NOW + ROSTER_REPUBLISH_MS));
    a.handle_timeout(NOW + ROSTER_REPUBLISH_MS - 1);
    assert!(broadcast(&mut a, Topic::Relays).is_none());
    a.handle_timeout(NOW + ROSTER_REPUBLISH_MS);
    assert!(broadcast(&mut a, Topic::Relays).is_some());

    // Another relay's roster reaches a relay through gossip: taken, not refused.
    let mut other = relay(2_000);
    other.set_roster(NOW, vec![entry(&a)]).unwrap();
    let bytes = broadcast(&mut other, Topic::Relays).unwrap();
    a.handle_message(NOW + 1, None, &bytes);
    assert!(a.reject_counts().is_empty(), "{:?}", a.reject_counts());
    // So is another relay's offer.
    let (_, offer) = post(&mut other, NOW + 2);
    a.handle_message(NOW + 2, None, &offer);
    assert!(a.reject_counts().is_empty(), "{:?}", a.reject_counts());
    // The same offer sent directly is a refusal, as before.
    a.handle_message(NOW + 2, Some(other.id()), &offer);
    assert_eq!(a.reject_counts().get("wrong_domain"), Some(&1));
}
