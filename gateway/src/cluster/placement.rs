//! Which node of a cluster is a user's (an account's, a group's) home: rendezvous hashing over
//! the live members.
//!
//! Every member scores every user, `score(node, user)`, and the user's home is the member with
//! the highest score; its replica, the next. When a member leaves, only the users it was home
//! to move (each to its own next-best member); when one joins, it takes from each other member
//! only the users it now outscores, about 1/N of them. There is no ring to rebalance, no virtual
//! nodes and no state: any node with the same member list computes the same placement, which
//! is why the list in etcd is all the nodes share (`docs/decisions.md`, "Cluster").
//!
//! The score must be the same on every node and every version of hop: it is a fixed 64-bit
//! mixer (the splitmix64 finaliser) over the node's hash and the user id's two halves, never a
//! hasher with a per-process seed. A node's hash is the first 8 bytes of
//! BLAKE2s("hop node v1" ‖ node id), computed once when the member is seen.

use blake2::{Blake2s256, Digest};
use hop_protocol::UserId;

const NODE_HASH_CONTEXT: &[u8] = b"hop node v1";

/// The stable hash of a node id that its scores start from.
pub fn node_hash(node_id: &str) -> u64 {
    let mut hasher = Blake2s256::new();
    hasher.update(NODE_HASH_CONTEXT);
    hasher.update(node_id.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The splitmix64 finaliser: a bijection on u64 whose output bits each depend on every input bit.
const fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// How much node `node_hash` wants `user`; the highest score wins.
pub fn score(node_hash: u64, user: UserId) -> u64 {
    mix(mix(node_hash ^ user.high()) ^ user.low())
}

/// The index in `nodes` (node hashes) of the highest-scoring node for `user`, ties broken by
/// the lower index (hashes of distinct ids tie with probability 2⁻⁶⁴); `None` for no nodes.
pub fn home(nodes: &[u64], user: UserId) -> Option<usize> {
    ranked(nodes, user).next()
}

/// The indices in `nodes` of `user`'s home and of its replica (the next-highest score), with
/// the ties of [`home`]; without allocating.
pub fn first_two(nodes: &[u64], user: UserId) -> (Option<usize>, Option<usize>) {
    let mut best: Option<(u64, usize)> = None;
    let mut next: Option<(u64, usize)> = None;
    for (index, &hash) in nodes.iter().enumerate() {
        let scored = (score(hash, user), index);
        // Higher score first; for equal scores the lower index, which comes first here.
        if best.is_none_or(|best| scored.0 > best.0) {
            next = best;
            best = Some(scored);
        } else if next.is_none_or(|next| scored.0 > next.0) {
            next = Some(scored);
        }
    }
    (best.map(|best| best.1), next.map(|next| next.1))
}

/// The indices of `nodes` in the order `user` prefers them: its home first, then its replica.
/// Allocates nothing for the first two; sorts a copy for more.
pub fn ranked(nodes: &[u64], user: UserId) -> impl Iterator<Item = usize> {
    let mut scored: Vec<(u64, usize)> = nodes
        .iter()
        .enumerate()
        .map(|(index, &hash)| (score(hash, user), index))
        .collect();
    // Highest score first; for equal scores the lower index.
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, index)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(count: u64) -> Vec<UserId> {
        (0..count)
            .map(|n| {
                UserId::from_public_key(
                    &[n as u8, (n >> 8) as u8, (n >> 16) as u8, 7]
                        .repeat(8)
                        .try_into()
                        .unwrap(),
                )
            })
            .collect()
    }

    fn hashes(ids: &[&str]) -> Vec<u64> {
        ids.iter().map(|id| node_hash(id)).collect()
    }

    #[test]
    fn the_score_is_the_same_on_every_node_and_version() {
        // Pinned values: a change here moves every user of every running cluster.
        assert_eq!(node_hash("n1"), node_hash("n1"));
        assert_ne!(node_hash("n1"), node_hash("n2"));
        let user = UserId::from_halves(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210).unwrap();
        assert_eq!(
            score(0, user),
            mix(mix(0x0123_4567_89ab_cdef) ^ 0xfedc_ba98_7654_3210)
        );
        assert_eq!(mix(0), 0);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
    }

    #[test]
    fn users_spread_evenly_over_the_nodes() {
        let nodes = hashes(&["n1", "n2", "n3"]);
        let mut counts = [0usize; 3];
        let all = users(30_000);
        for &user in &all {
            counts[home(&nodes, user).unwrap()] += 1;
        }
        for count in counts {
            // 10,000 expected each; six standard deviations is about ±500.
            assert!((9_400..=10_600).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_users_and_to_their_replicas() {
        let three = hashes(&["n1", "n2", "n3"]);
        let two = hashes(&["n1", "n3"]);
        for user in users(5_000) {
            let mut order = ranked(&three, user);
            let (first, second) = (order.next().unwrap(), order.next().unwrap());
            let after = home(&two, user).unwrap();
            let after_in_three = if after == 0 { 0 } else { 2 };
            if first == 1 {
                // n2's users go to their replica.
                assert_eq!(after_in_three, second);
            } else {
                assert_eq!(after_in_three, first, "a user of a live node moved");
            }
        }
    }

    #[test]
    fn the_first_two_are_the_ranking_s_first_two() {
        for ids in [&["n1"][..], &["n1", "n2"], &["n1", "n2", "n3", "n4", "n5"]] {
            let nodes = hashes(ids);
            for user in users(2_000) {
                let mut order = ranked(&nodes, user);
                assert_eq!(first_two(&nodes, user), (order.next(), order.next()));
            }
        }
        // Equal scores: the lower index first, as `ranked` has it.
        let user = users(1)[0];
        assert_eq!(first_two(&[5, 5, 5], user), (Some(0), Some(1)));
        assert_eq!(first_two(&[], user), (None, None));
    }

    #[test]
    fn a_node_joining_takes_about_its_share_and_nothing_moves_between_the_others() {
        let three = hashes(&["n1", "n2", "n3"]);
        let four = hashes(&["n1", "n2", "n3", "n4"]);
        let all = users(20_000);
        let mut moved = 0;
        for &user in &all {
            let before = home(&three, user).unwrap();
            let after = home(&four, user).unwrap();
            if after != before {
                assert_eq!(after, 3, "a user moved between two old nodes");
                moved += 1;
            }
        }
        // A quarter (5,000) expected.
        assert!((4_500..=5_500).contains(&moved), "{moved}");
    }

    #[test]
    fn the_order_of_the_member_list_does_not_matter() {
        let a = ["n1", "n2", "n3"];
        let b = ["n3", "n1", "n2"];
        for user in users(1_000) {
            let ha = a[home(&hashes(&a), user).unwrap()];
            let hb = b[home(&hashes(&b), user).unwrap()];
            assert_eq!(ha, hb);
        }
        assert_eq!(home(&[], users(1)[0]), None);
    }
}
