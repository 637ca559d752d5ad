// Play a fragmented MP4 while it downloads: Media Source Extensions (ManagedMediaSource on
// Safari/iOS, MediaSource elsewhere); where neither exists, or the codec is refused, the whole
// response is collected and played as one file.

export function mediaSourceClass() {
  return window.ManagedMediaSource || window.MediaSource || null;
}

function findBox(bytes, name, from = 0) {
  const a = name.charCodeAt(0), b = name.charCodeAt(1), c = name.charCodeAt(2), d = name.charCodeAt(3);
  for (let i = Math.max(4, from); i + 4 <= bytes.length; i += 1) {
    if (bytes[i] === a && bytes[i + 1] === b && bytes[i + 2] === c && bytes[i + 3] === d) return i;
  }
  return -1;
}

/**
 * The RFC 6381 codecs string of an MP4 init segment: avc1.PPCCLL from the avcC box (profile,
 * constraint flags, level: ISO/IEC 14496-15 AVCDecoderConfigurationRecord bytes 1-3), plus
 * mp4a.40.2 (AAC-LC) when an mp4a sample entry is present. null until the avcC is complete.
 */
export function codecsOf(bytes) {
  const at = findBox(bytes, 'avcC');
  if (at < 0 || at + 8 > bytes.length) return null;
  const hex = (v) => v.toString(16).padStart(2, '0').toUpperCase();
  const video = `avc1.${hex(bytes[at + 5])}${hex(bytes[at + 6])}${hex(bytes[at + 7])}`;
  return findBox(bytes, 'mp4a') >= 0 ? `${video}, mp4a.40.2` : video;
}

function concat(parts) {
  const total = parts.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(total);
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

function appendAsync(sourceBuffer, data) {
  return new Promise((resolve, reject) => {
    const done = () => {
      sourceBuffer.removeEventListener('updateend', done);
      sourceBuffer.removeEventListener('error', fail);
      resolve();
    };
    const fail = () => {
      sourceBuffer.removeEventListener('updateend', done);
      sourceBuffer.removeEventListener('error', fail);
      reject(new Error('the browser could not play this video data'));
    };
    sourceBuffer.addEventListener('updateend', done);
    sourceBuffer.addEventListener('error', fail);
    sourceBuffer.appendBuffer(data);
  });
}

/** Resolve with performance.now() when the video shows its first frame. */
export function whenFirstFrame(video) {
  return new Promise((resolve) => {
    if (typeof video.requestVideoFrameCallback === 'function') {
      video.requestVideoFrameCallback(() => resolve(performance.now()));
    } else {
      video.addEventListener('playing', () => resolve(performance.now()), { once: true });
    }
  });
}

async function startPlaying(video, onMuted) {
  try {
    await video.play();
  } catch (e) {
    if (e && e.name === 'NotAllowedError') {
      // The browser allows only muted autoplay here: play muted and let the page say so.
      video.muted = true;
      onMuted?.();
      await video.play().catch(() => {});
    }
  }
}

/**
 * Feed `response` (a fetch Response with a fragmented MP4 body) into `video` and play it as soon
 * as the first fragment is in. Returns {blob, mode, firstByte, firstFrame, end} where the times
 * are performance.now() values ("mse" or "file" mode). `onFirstFrame(t)` fires when the first
 * frame is on screen (maybe before the response ends).
 */
export async function playStream(video, response, { onFirstFrame, onMuted } = {}) {
  const firstByte = performance.now();
  const MS = mediaSourceClass();
  const reader = response.body?.getReader?.();
  const parts = [];
  let firstFrame = null;
  const firstFrameSeen = whenFirstFrame(video).then((t) => {
    firstFrame = t;
    onFirstFrame?.(t);
    return t;
  });

  if (MS && reader) {
    // Read up to the init segment's codec description, then decide.
    let head = new Uint8Array(0);
    let codecs = null;
    let finished = false;
    while (!codecs) {
      const { value, done } = await reader.read();
      if (done) {
        finished = true;
        break;
      }
      parts.push(value);
      head = concat(parts);
      codecs = codecsOf(head);
    }
    const mime = codecs && `video/mp4; codecs="${codecs}"`;
    if (mime && MS.isTypeSupported(mime) && !finished) {
      const source = new MS();
      const url = URL.createObjectURL(source);
      if (MS === window.ManagedMediaSource) video.disableRemotePlayback = true;
      video.src = url;
      await new Promise((resolve) => source.addEventListener('sourceopen', resolve, { once: true }));
      const sourceBuffer = source.addSourceBuffer(mime);
      await appendAsync(sourceBuffer, head);
      startPlaying(video, onMuted);
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parts.push(value);
        await appendAsync(sourceBuffer, value);
      }
      const end = performance.now();
      if (source.readyState === 'open') source.endOfStream();
      const blob = new Blob(parts, { type: 'video/mp4' });
      video.dataset.responseEnd = String(end);
      return { blob, mode: 'mse', firstByte, firstFrame, end, firstFrameSeen, objectUrl: url };
    }
    // No usable MSE for this stream: read the rest and play it as a file.
    for (;;) {
      if (finished) break;
      const { value, done } = await reader.read();
      if (done) break;
      parts.push(value);
    }
  } else if (reader) {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parts.push(value);
    }
  } else {
    parts.push(new Uint8Array(await response.arrayBuffer()));
  }
  const end = performance.now();
  video.dataset.responseEnd = String(end);
  const blob = new Blob(parts, { type: 'video/mp4' });
  const url = URL.createObjectURL(blob);
  video.src = url;
  startPlaying(video, onMuted);
  return { blob, mode: 'file', firstByte, firstFrame, end, firstFrameSeen, objectUrl: url };
}
