//! The peak device memory of a stretch of work, sampled from the driver.

use candle_core::Device;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Samples the used memory of a CUDA device (`total − free`, whole device, every process)
/// every `period` on a thread of its own, and keeps the largest value, until
/// [`PeakMemory::finish`]. On a device that reports no memory (CPU, a build without the
/// `cuda` feature) the peak is `None`.
#[derive(Debug)]
pub struct PeakMemory {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Option<u64>>>,
}

impl PeakMemory {
    /// Starts sampling `device` every `period`.
    pub fn start(device: &Device, period: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (dev, flag) = (device.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut peak: Option<u64> = None;
            loop {
                if let Some((free, total)) = super::memory_info(&dev) {
                    let used = total.saturating_sub(free) as u64;
                    peak = Some(peak.map_or(used, |p| p.max(used)));
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(period);
            }
        });
        PeakMemory {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling (after one last sample) and returns the largest used memory seen,
    /// in bytes.
    pub fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().and_then(|h| h.join().ok().flatten())
    }
}

impl Drop for PeakMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_memory_reports_no_peak() {
        let p = PeakMemory::start(&Device::Cpu, Duration::from_millis(1));
        assert_eq!(p.finish(), None);
    }
}
