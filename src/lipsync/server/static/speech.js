// Speech input: record from the microphone (MediaRecorder) and show a waveform + duration
// (decodeAudioData + canvas) before anything is sent.

/** The first container/codec this browser's MediaRecorder can write that the server decodes. */
export function recorderMimeType() {
  if (typeof MediaRecorder === 'undefined') return null;
  const candidates = ['audio/webm;codecs=opus', 'audio/ogg;codecs=opus', 'audio/webm', 'audio/ogg', 'audio/mp4'];
  return candidates.find((t) => MediaRecorder.isTypeSupported?.(t)) ?? '';
}

/** A file name whose extension matches a recording's type (the server sniffs bytes anyway). */
export function fileNameFor(type) {
  if (/ogg/.test(type)) return 'speech.ogg';
  if (/mp4|aac|m4a/.test(type)) return 'speech.m4a';
  return 'speech.webm';
}

/**
 * Microphone recording. `start()` asks for the microphone and records; `stop()` resolves with a
 * Blob. `onTick(seconds)` is called while recording.
 */
export class Recorder {
  constructor({ onTick } = {}) {
    this.onTick = onTick;
    this.recorder = null;
    this.stream = null;
    this.chunks = [];
    this.startedAt = 0;
    this.timer = null;
  }

  get recording() {
    return this.recorder?.state === 'recording';
  }

  async start() {
    if (!window.isSecureContext) {
      throw new Error('Browsers allow the microphone only on https:// pages or on this machine (localhost). Choose a recording file instead.');
    }
    if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === 'undefined') {
      throw new Error('This browser cannot record from a microphone. Choose a recording file instead.');
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
    const mimeType = recorderMimeType();
    this.recorder = new MediaRecorder(this.stream, mimeType ? { mimeType } : undefined);
    this.chunks = [];
    this.recorder.addEventListener('dataavailable', (e) => {
      if (e.data && e.data.size) this.chunks.push(e.data);
    });
    this.recorder.start(250);
    this.startedAt = performance.now();
    this.timer = setInterval(() => this.onTick?.((performance.now() - this.startedAt) / 1000), 100);
  }

  stop() {
    return new Promise((resolve, reject) => {
      const rec = this.recorder;
      if (!rec || rec.state === 'inactive') {
        reject(new Error('not recording'));
        return;
      }
      rec.addEventListener('stop', () => {
        clearInterval(this.timer);
        this.stream?.getTracks().forEach((t) => t.stop());
        const type = rec.mimeType || this.chunks[0]?.type || 'audio/webm';
        const blob = new Blob(this.chunks, { type });
        blob.recordedSeconds = (performance.now() - this.startedAt) / 1000;
        resolve(blob);
      }, { once: true });
      rec.stop();
    });
  }
}

let audioContext = null;

/** Decode any audio the browser can (AudioBuffer) or null when it cannot. */
export async function decodeAudio(blob) {
  try {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return null;
    audioContext ??= new Ctx();
    const data = await blob.arrayBuffer();
    return await audioContext.decodeAudioData(data);
  } catch {
    return null;
  }
}

/** Min/max per pixel column of the first channel, drawn centred on the canvas. */
export function drawWaveform(canvas, buffer) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
  const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, width, height);
  const mid = height / 2;
  ctx.fillStyle = '#c9c6bd';
  ctx.fillRect(0, mid, width, 1);
  if (!buffer) return;
  const samples = buffer.getChannelData(0);
  const per = Math.max(1, Math.floor(samples.length / width));
  let peak = 1e-4;
  for (let i = 0; i < samples.length; i += 1) peak = Math.max(peak, Math.abs(samples[i]));
  const scale = (mid - 2) / peak;
  ctx.fillStyle = '#1f5fbf';
  for (let x = 0; x < width; x += 1) {
    let lo = 0;
    let hi = 0;
    const start = x * per;
    const end = Math.min(samples.length, start + per);
    for (let i = start; i < end; i += 1) {
      const v = samples[i];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const top = mid - hi * scale;
    ctx.fillRect(x, top, 1, Math.max(1, (hi - lo) * scale));
  }
}
