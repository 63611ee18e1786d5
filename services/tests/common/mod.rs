//! A fake engine for the services' tests: records commands and missions, fails on demand.

#![allow(dead_code)] // each test crate uses part of it

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use events::{DeliveryCommand, DroneId, DroneSnapshot, Error as WireError, FleetControl, FlightStatus, GeoPoint};
use parking_lot::Mutex;

#[derive(Default)]
pub struct FakeFleet {
    pub commands: Mutex<Vec<DeliveryCommand>>,
    pub missions: Mutex<Vec<events::Mission>>,
    pub fail: AtomicBool,
    pub fail_queue: AtomicBool,
    /// Cancel commands fail (an undo that cannot be made).
    pub fail_cancels: AtomicBool,
    /// How long each command takes, ms (a slow shard).
    pub command_delay_ms: AtomicU64,
    /// Drones the engine has on a delivery: (drone, delivery).
    pub flying: Mutex<Vec<(DroneId, u64)>>,
}

impl events::WorkQueues for FakeFleet {
    async fn enqueue(&self, queue: events::QueueName, key: u64, payload: Vec<u8>) -> Result<u64, WireError> {
        assert_eq!(queue, events::QueueName::DroneCommands);
        if self.fail_queue.load(Ordering::Relaxed) {
            return Err(WireError::StorageFull);
        }
        let m = events::Mission::from_bytes(&payload)?;
        assert_eq!(m.drone_id, key, "missions are keyed by drone");
        let mut missions = self.missions.lock();
        missions.push(m);
        Ok(missions.len() as u64)
    }

    async fn lease(
        &self,
        _: events::QueueName,
        _: u64,
        _: events::KeyRange,
        _: usize,
        _: std::time::Duration,
    ) -> Result<Vec<events::Leased>, WireError> {
        Ok(Vec::new())
    }

    fn settle(&self, _: events::QueueName, id: u64, _: u64, _: events::Verdict) -> Result<(), WireError> {
        Err(WireError::UnknownMessage(id))
    }

    fn release(&self, _: events::QueueName, _: u64) {}

    fn attach(&self, _: events::QueueName, _: events::KeyRange) -> Result<u64, WireError> {
        Ok(1)
    }
}

impl FleetControl for FakeFleet {
    async fn command(&self, cmd: DeliveryCommand) -> Result<(), WireError> {
        let delay = self.command_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        if self.fail.load(Ordering::Relaxed)
            || (self.fail_cancels.load(Ordering::Relaxed) && matches!(cmd, DeliveryCommand::Cancel { .. }))
        {
            return Err(WireError::ShuttingDown);
        }
        if let DeliveryCommand::Create { drone_id, delivery_id, .. } = cmd
            && let Some(&(_, busy)) =
                self.flying.lock().iter().find(|(d, other)| *d == drone_id && *other != delivery_id)
        {
            return Err(WireError::DroneBusy { drone: drone_id, delivery: busy });
        }
        self.commands.lock().push(cmd);
        Ok(())
    }

    async fn drone(&self, id: DroneId) -> Result<Option<DroneSnapshot>, WireError> {
        Ok((id < 100).then_some(DroneSnapshot {
            drone_id: id,
            position: GeoPoint::new(47.61, -122.31),
            status: FlightStatus::Flying,
            battery_pct: 77.0,
            last_seq: 9,
            updated_us: events::now_us(),
            delivery: self.flying.lock().iter().find(|(d, _)| *d == id).map(|(_, delivery)| *delivery),
        }))
    }
}
