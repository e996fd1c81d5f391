//! The Ethernet header and its VLAN tags, saved before the frame's head moves (encapsulation,
//! decapsulation, ICMP replies) and written back at the new front. Offsets are constants per
//! tag count: packet writes at constant offsets are the ones the verifier can always prove.

use crate::reader::PacketReader;

/// A saved Ethernet header: MACs and up to two VLAN tags (TCI and the next TPID each).
pub struct L2 {
    /// Destination MAC as received.
    #[allow(
        dead_code,
        reason = "read by the decapsulator only; `expect` would fail in the crate root that uses it"
    )]
    pub dst: [u8; 6],
    /// Source MAC as received.
    pub src: [u8; 6],
    tags: [u8; 8],
    vlans: usize,
}

impl L2 {
    /// Saves the header of a frame with `vlans` (0..=2) tags.
    #[inline(always)]
    pub fn save(r: &PacketReader, vlans: usize) -> Option<L2> {
        let macs = r.read::<[u8; 12]>(0)?;
        let tags = match vlans {
            0 => [0; 8],
            1 => {
                let t = r.read::<[u8; 4]>(12)?;
                [t[0], t[1], t[2], t[3], 0, 0, 0, 0]
            }
            _ => r.read::<[u8; 8]>(12)?,
        };
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&macs[..6]);
        src.copy_from_slice(&macs[6..]);
        Some(L2 {
            dst,
            src,
            tags,
            vlans,
        })
    }

    /// Writes `dst`, `src`, the saved tags and `ether_type` at the front of the frame `r` sees.
    #[inline(always)]
    pub fn write(
        &self,
        r: &PacketReader,
        dst: [u8; 6],
        src: [u8; 6],
        ether_type: u16,
    ) -> Option<()> {
        r.write(0, dst)?;
        r.write(6, src)?;
        let t = &self.tags;
        let et = ether_type.to_be_bytes();
        match self.vlans {
            0 => r.write(12, et),
            1 => {
                r.write::<[u8; 4]>(12, [t[0], t[1], t[2], t[3]])?;
                r.write(16, et)
            }
            _ => {
                r.write(12, *t)?;
                r.write(20, et)
            }
        }
    }
}
