//! hopd in a cluster: membership through etcd (`etcd`, `membership`), and where each user
//! lives (`placement`). `docs/cluster.md` is the operator's view.

pub mod etcd;
pub mod links;
pub mod membership;
pub mod placement;
