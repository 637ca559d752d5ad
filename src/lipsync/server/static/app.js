// The page: faces (gallery, upload, delete, default), speech (record or file, waveform), options,
// and the video: an idle loop of the chosen face, replaced by the speech video as it streams.

import { ApiError, getJSON, parseServerTiming, plainWords, request } from './api.js';
import { playStream } from './player.js';
import { Recorder, decodeAudio, drawWaveform, fileNameFor } from './speech.js';

const $ = (id) => document.getElementById(id);
const el = {
  idle: $('idle-video'),
  speech: $('speech-video'),
  note: $('screen-note'),
  replay: $('replay'),
  download: $('download'),
  timings: $('timings'),
  gallery: $('gallery'),
  dropzone: $('dropzone'),
  avatarFile: $('avatar-file'),
  record: $('record'),
  recordTime: $('record-time'),
  audioFile: $('audio-file'),
  waveform: $('waveform'),
  speechInfo: $('speech-info'),
  preview: $('speech-preview'),
  expression: $('expression-scale'),
  expressionValue: $('expression-scale-value'),
  still: $('still'),
  blink: $('blink'),
  size: $('size'),
  generate: $('generate'),
  status: $('status'),
  error: $('error'),
};

/** What the page knows; also read by the browser tests. */
const state = {
  avatars: [],
  defaultId: null,
  selectedId: null,
  speech: null, // {blob, name, seconds}
  recordingSeconds: 0,
  generating: false,
  uploads: 0,
  idleUrl: null,
  last: null, // the last generation: times, mode, server timings
  errors: [],
};
window.lipsyncPage = state;

const IDLE_SECONDS = 4;
let downloadUrl = null;
let speechUrl = null;

// ------------------------------------------------------------------------------ messages
function say(text) {
  el.status.textContent = text;
}

function showError(error) {
  const text = error instanceof ApiError ? error.plain : String(error?.message || error);
  state.errors.push({ code: error?.code || 'error', text });
  el.error.textContent = text;
  el.error.hidden = false;
  say('');
}

function clearError() {
  el.error.hidden = true;
  el.error.textContent = '';
}

function retrying(what) {
  return (seconds, attempt) => {
    say(`The server is busy; trying ${what} again in ${seconds} s (attempt ${attempt} of 5)…`);
  };
}

// ------------------------------------------------------------------------------ options
function options() {
  return {
    expression_scale: el.expression.value,
    still: el.still.checked ? 'true' : 'false',
    blink: el.blink.checked ? 'true' : 'false',
    size: el.size.value,
  };
}

// ------------------------------------------------------------------------------ avatars
async function loadAvatars() {
  const list = await getJSON('/avatars', { onRetry: retrying('to list the faces') });
  state.avatars = list.avatars;
  state.defaultId = list.default_id;
  if (!state.avatars.some((a) => a.id === state.selectedId)) {
    state.selectedId = state.defaultId ?? state.avatars[0]?.id ?? null;
  }
  renderGallery();
  updateIdle();
  updateGenerate();
}

function avatarLabel(index, avatar) {
  return `Face ${index + 1}${avatar.id === state.defaultId ? ' (default)' : ''}`;
}

/** "Face 2 — added 4 Dec 2026, 08:12 · 910×1137 px": tells apart faces whose thumbnails look
 * alike (the same photo uploaded twice, once rotated). */
function avatarDetails(index, avatar) {
  const parts = [];
  const created = avatar.info?.created;
  if (typeof created === 'number') {
    parts.push(`added ${new Date(created * 1000).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' })}`);
  }
  const size = avatar.info?.source_size;
  if (Array.isArray(size) && size.length === 2) parts.push(`${size[0]}×${size[1]} px`);
  return parts.length ? `${avatarLabel(index, avatar)} — ${parts.join(' · ')}` : avatarLabel(index, avatar);
}

function renderGallery() {
  const focused = document.activeElement?.dataset?.action
    ? { action: document.activeElement.dataset.action, id: document.activeElement.dataset.id }
    : null;
  el.gallery.replaceChildren();
  state.avatars.forEach((avatar, index) => {
    const li = document.createElement('li');
    li.dataset.id = avatar.id;
    const pick = document.createElement('button');
    pick.type = 'button';
    pick.className = 'pick';
    pick.dataset.action = 'pick';
    pick.dataset.id = avatar.id;
    pick.setAttribute('aria-pressed', String(avatar.id === state.selectedId));
    pick.setAttribute('aria-label', `Use ${avatarLabel(index, avatar)}`);
    pick.title = avatarDetails(index, avatar);
    const img = document.createElement('img');
    img.src = `/avatars/${avatar.id}/image?size=192`;
    img.alt = '';
    img.width = 96;
    img.height = 96;
    pick.append(img);
    if (avatar.id === state.defaultId) {
      const badge = document.createElement('span');
      badge.className = 'badge';
      badge.textContent = 'default';
      badge.setAttribute('aria-hidden', 'true');
      pick.append(badge);
    }
    pick.addEventListener('click', () => selectAvatar(avatar.id));

    const actions = document.createElement('div');
    actions.className = 'actions';
    const makeDefault = document.createElement('button');
    makeDefault.type = 'button';
    makeDefault.textContent = 'Default';
    makeDefault.dataset.action = 'default';
    makeDefault.dataset.id = avatar.id;
    makeDefault.setAttribute('aria-label', `Make ${avatarLabel(index, avatar)} the default`);
    makeDefault.disabled = avatar.id === state.defaultId;
    makeDefault.addEventListener('click', () => setDefault(avatar.id));
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.textContent = 'Delete';
    remove.dataset.action = 'delete';
    remove.dataset.id = avatar.id;
    remove.setAttribute('aria-label', `Delete ${avatarLabel(index, avatar)}`);
    remove.disabled = avatar.id === state.defaultId;
    if (remove.disabled) remove.title = 'The default face cannot be deleted';
    remove.addEventListener('click', () => deleteAvatar(avatar.id));
    actions.append(makeDefault, remove);
    li.append(pick, actions);
    el.gallery.append(li);
  });
  if (focused) {
    const again = el.gallery.querySelector(`[data-action="${focused.action}"][data-id="${focused.id}"]`);
    (again && !again.disabled ? again : el.gallery.querySelector('.pick'))?.focus();
  }
}

function selectAvatar(id) {
  state.selectedId = id;
  for (const b of el.gallery.querySelectorAll('.pick')) {
    b.setAttribute('aria-pressed', String(b.dataset.id === id));
  }
  const index = state.avatars.findIndex((a) => a.id === id);
  say(`${avatarLabel(index, state.avatars[index])} selected.`);
  updateIdle();
  updateGenerate();
}

async function uploadAvatar(file) {
  if (!file) return;
  clearError();
  say('Adding the portrait (finding the face)…');
  state.uploads += 1;
  try {
    const response = await request('/avatars', {
      makeInit: () => {
        const form = new FormData();
        form.append('image', file, file.name || 'portrait');
        return { method: 'POST', body: form };
      },
      field: 'image',
      onRetry: retrying('to add the portrait'),
    });
    const created = await response.json();
    state.selectedId = created.id;
    await loadAvatars();
    say(created.cache_hit ? 'That face was already here; it is selected.' : 'Face added and selected.');
  } catch (e) {
    showError(e);
  } finally {
    state.uploads -= 1;
    el.avatarFile.value = '';
  }
}

async function setDefault(id) {
  clearError();
  try {
    await request(`/avatars/${id}/default`, {
      makeInit: () => ({ method: 'POST' }),
      onRetry: retrying('to set the default face'),
    });
    await loadAvatars();
    say('Default face changed.');
  } catch (e) {
    showError(e);
  }
}

async function deleteAvatar(id) {
  clearError();
  try {
    await request(`/avatars/${id}`, { makeInit: () => ({ method: 'DELETE' }), onRetry: retrying('to delete') });
    if (state.selectedId === id) state.selectedId = null;
    await loadAvatars();
    say('Face deleted.');
    el.gallery.querySelector('.pick')?.focus();
  } catch (e) {
    showError(e);
  }
}

function setupDrop() {
  const zone = el.dropzone.closest('section');
  zone.addEventListener('dragover', (e) => {
    if ([...(e.dataTransfer?.types || [])].includes('Files')) {
      e.preventDefault();
      el.dropzone.classList.add('over');
    }
  });
  zone.addEventListener('dragleave', () => el.dropzone.classList.remove('over'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    el.dropzone.classList.remove('over');
    const file = e.dataTransfer?.files?.[0];
    if (file) uploadAvatar(file);
  });
  el.avatarFile.addEventListener('change', () => uploadAvatar(el.avatarFile.files[0]));
}

// ------------------------------------------------------------------------------ idle loop
let idleTimer = null;
let idleAbort = null;

/** Ask for the idle clip of the current face and options, a moment after the last change (a
 * slider drag asks once), cancelling the request for a clip no longer wanted: the server stops
 * rendering it, so it never delays a video. */
function updateIdle() {
  clearTimeout(idleTimer);
  idleTimer = setTimeout(loadIdle, 300);
}

async function loadIdle() {
  if (!state.selectedId) {
    el.idle.removeAttribute('src');
    el.note.textContent = 'Add a portrait to begin.';
    return;
  }
  const query = new URLSearchParams({ seconds: String(IDLE_SECONDS), ...options() });
  const url = `/avatars/${state.selectedId}/idle.mp4?${query}`;
  if (url === state.idleUrl) return;
  if (state.generating) return; // asked again when the video is done
  state.idleUrl = url;
  idleAbort?.abort();
  const abort = new AbortController();
  idleAbort = abort;
  el.note.textContent = 'Preparing the face…';
  try {
    // Fetch first (rendering takes a moment, the server may be busy), then play from memory.
    const response = await request(url, {
      makeInit: () => ({ signal: abort.signal }),
      onRetry: retrying('the idle face'),
    });
    const blob = await response.blob();
    if (idleAbort === abort) idleAbort = null;
    if (state.idleUrl !== url) return; // the choice changed meanwhile
    const old = el.idle.src;
    el.idle.src = URL.createObjectURL(blob);
    if (old.startsWith('blob:')) URL.revokeObjectURL(old);
    el.idle.dataset.source = url;
    await el.idle.play().catch(() => {});
    el.note.textContent = '';
  } catch (e) {
    if (abort.signal.aborted) return;
    if (state.idleUrl === url) {
      state.idleUrl = null;
      el.note.textContent = '';
      showError(e);
    }
  }
}

// ------------------------------------------------------------------------------ speech
/** Shortest take the page accepts: the encoder's first chunk (250 ms, see Recorder.start) plus a
 * margin; a shorter take holds no speech and the server would answer 422. */
const MIN_RECORDING_S = 0.3;
const recorder = new Recorder({
  onTick: (seconds) => {
    state.recordingSeconds = seconds;
    el.recordTime.textContent = `${seconds.toFixed(1)} s`;
  },
});

async function toggleRecording() {
  clearError();
  if (recorder.recording) {
    const blob = await recorder.stop();
    el.record.setAttribute('aria-pressed', 'false');
    el.record.textContent = 'Record';
    if (!blob.size || blob.recordedSeconds < MIN_RECORDING_S) {
      // Nothing (or a blink) was captured: say so here instead of sending it for a 422.
      showError(new Error(`The recording is too short (${blob.recordedSeconds.toFixed(1)} s): press Record, speak, then press Stop.`));
      return;
    }
    await setSpeech(blob, fileNameFor(blob.type));
    return;
  }
  try {
    state.recordingSeconds = 0;
    await recorder.start();
    el.record.setAttribute('aria-pressed', 'true');
    el.record.textContent = 'Stop';
    say('Recording… press Stop when you are done.');
  } catch (e) {
    const words = {
      NotAllowedError: 'The microphone is blocked. Allow it in the browser, or choose a recording file instead.',
      NotFoundError: 'No microphone was found. Connect one, or choose a recording file instead.',
      NotReadableError: 'The microphone is in use by another program. Close it, or choose a recording file instead.',
    }[e?.name];
    showError(words ? new Error(words) : e);
  }
}

async function setSpeech(blob, name) {
  const buffer = await decodeAudio(blob);
  const seconds = buffer ? buffer.duration : null;
  state.speech = { blob, name, seconds };
  drawWaveform(el.waveform, buffer);
  if (speechUrl) URL.revokeObjectURL(speechUrl);
  speechUrl = URL.createObjectURL(blob);
  el.preview.src = speechUrl;
  el.preview.hidden = false;
  const text = seconds != null
    ? `Speech ready: ${seconds.toFixed(1)} s (${name}).`
    : `Speech ready (${name}); this browser cannot show its length, the server may still read it.`;
  el.speechInfo.textContent = text;
  el.waveform.setAttribute('aria-label', seconds != null ? `Waveform of ${seconds.toFixed(1)} s of speech` : 'Waveform unavailable');
  say(text);
  updateGenerate();
}

// ------------------------------------------------------------------------------ generate
function updateGenerate() {
  el.generate.disabled = state.generating || !state.speech || !state.selectedId;
}

function showTimings(rows) {
  el.timings.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = value;
    el.timings.append(dt, dd);
  }
}

const seconds = (ms) => `${(ms / 1000).toFixed(2)} s`;
const SERVER_NAMES = {
  audio: 'Server: audio decode', precompute: 'Server: face lookup', motion: 'Server: motion',
  render: 'Server: render', encode: 'Server: encode', queue: 'Server: waiting for a worker',
  first_chunk: 'Server: first fragment ready', total: 'Server: total',
};

function showSpeechVideo(on) {
  el.speech.classList.toggle('showing', on);
  el.note.hidden = on;
}

async function generate() {
  if (!state.speech || state.generating) return;
  clearError();
  state.generating = true;
  updateGenerate();
  if (idleAbort) {
    // An idle clip still rendering would hold the worker: drop it, ask again afterwards.
    idleAbort.abort();
    idleAbort = null;
    state.idleUrl = null;
  }
  el.download.setAttribute('aria-disabled', 'true');
  el.download.tabIndex = -1;
  el.replay.disabled = true;
  showSpeechVideo(false);
  el.speech.pause();
  el.speech.removeAttribute('src');
  el.speech.load();
  delete el.speech.dataset.responseEnd;
  say('Rendering…');
  const t0 = performance.now();
  const run = { mode: null, start: t0, firstByte: null, firstFrame: null, end: null, server: [], frames: null };
  state.last = run;
  try {
    const response = await request('/generate', {
      makeInit: () => {
        const form = new FormData();
        form.append('audio', state.speech.blob, state.speech.name);
        if (state.selectedId) form.append('avatar_id', state.selectedId);
        for (const [k, v] of Object.entries(options())) form.append(k, v);
        form.append('stream', 'true');
        return { method: 'POST', body: form };
      },
      field: 'audio',
      onRetry: retrying('the video'),
    });
    run.server = parseServerTiming(response.headers.get('Server-Timing'));
    const result = await playStream(el.speech, response, {
      onFirstFrame: (t) => {
        run.firstFrame = t - t0;
        showSpeechVideo(true);
        say('Playing while it renders…');
      },
      onMuted: () => say('Playing without sound (the browser blocked it); press Replay to hear it.'),
    });
    run.mode = result.mode;
    run.firstByte = result.firstByte - t0;
    run.end = result.end - t0;
    await Promise.race([result.firstFrameSeen, new Promise((r) => setTimeout(r, 5000))]);
    if (run.firstFrame == null && result.firstFrame != null) run.firstFrame = result.firstFrame - t0;
    if (downloadUrl) URL.revokeObjectURL(downloadUrl);
    downloadUrl = URL.createObjectURL(result.blob);
    el.download.href = downloadUrl;
    el.download.setAttribute('aria-disabled', 'false');
    el.download.tabIndex = 0;
    el.replay.disabled = false;
    const rows = [
      ['Time to first byte', seconds(run.firstByte)],
      ['Time to first frame', run.firstFrame != null ? seconds(run.firstFrame) : '–'],
      ['Whole video received', seconds(run.end)],
      ['Playback', run.mode === 'mse' ? 'streamed (Media Source Extensions)' : 'whole file'],
    ];
    for (const t of run.server) {
      if (t.ms != null) rows.push([SERVER_NAMES[t.name] || `Server: ${t.name}`, seconds(t.ms)]);
    }
    showTimings(rows);
    say(run.mode === 'mse' ? 'Done: the video streamed while it rendered.' : 'Done.');
  } catch (e) {
    showSpeechVideo(false);
    if (e instanceof ApiError) {
      showError(e);
    } else {
      console.error(e);
      showError(new Error('The video stopped part-way: the connection to the server was lost or the server gave up. Please try again.'));
    }
  } finally {
    state.generating = false;
    updateGenerate();
    updateIdle();
  }
}

function replay() {
  if (!el.speech.src) return;
  el.speech.currentTime = 0;
  el.speech.muted = false;
  showSpeechVideo(true);
  el.speech.play().catch(() => {});
}

// ------------------------------------------------------------------------------ wiring
el.speech.addEventListener('ended', () => showSpeechVideo(false));
el.record.addEventListener('click', toggleRecording);
el.audioFile.addEventListener('change', () => {
  const file = el.audioFile.files[0];
  if (file) {
    clearError();
    setSpeech(file, file.name);
  }
});
el.expression.addEventListener('input', () => {
  el.expressionValue.textContent = Number(el.expression.value).toFixed(1);
});
for (const control of [el.expression, el.still, el.blink, el.size]) {
  control.addEventListener('change', updateIdle);
}
el.generate.addEventListener('click', generate);
el.replay.addEventListener('click', replay);
setupDrop();
drawWaveform(el.waveform, null);
loadAvatars().catch((e) => showError(e instanceof ApiError ? e : new Error(plainWords('network'))));
