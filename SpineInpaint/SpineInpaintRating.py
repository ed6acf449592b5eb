"""SpineInpaint Rating: blinded reader-study panel (realistic? / pathology present?) for 3D Slicer.

Thin Qt layer: all state and behaviour live in ``SpineInpaintLib.rating.RatingLogic`` (tested headless under
slicer-core); answers go to the study's answer store through ``spine_ldm.study`` (the same store as the
browser app ``spine-ldm study serve``).
"""
import os

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


class SpineInpaintRating(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SpineInpaint Rating"
        self.parent.categories = ["Spine"]
        self.parent.dependencies = []
        self.parent.contributors = ["SpineInpaint contributors"]
        self.parent.helpText = (
            "Blinded reader study for inpainted lumbar-spine pathology: open a study folder or the study server's "
            "URL (spine-ldm study serve) with your reader token, "
            "then answer 'Realistic?' and '&lt;condition&gt; present?' for each case.<br>"
            "Keys: <b>Y</b>/<b>N</b> realistic, <b>P</b>/<b>A</b> pathology present/absent, <b>1-5</b> confidence, "
            "<b>Enter</b> save &amp; next, <b>B</b> back, <b>L</b> landmark on/off, while this panel has the keyboard "
            "focus (click in it; the slice views keep their own keys). Answers are saved immediately and "
            "the panel resumes at your first unanswered case. A local study folder must be your own copy (without "
            "the organizer's truth key).")
        self.parent.acknowledgementText = "Reader study of Hansen et al., 'Inpainting Pathology in Lumbar Spine MRI with Latent Diffusion'."


class SpineInpaintRatingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.shortcuts = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineInpaintRating.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineInpaintRatingLogic()

        self.ui.openButton.connect("clicked(bool)", self.onOpen)
        self.ui.realisticYesButton.connect("clicked(bool)", lambda _=None: self.onSet("realistic", "yes"))
        self.ui.realisticNoButton.connect("clicked(bool)", lambda _=None: self.onSet("realistic", "no"))
        self.ui.presentYesButton.connect("clicked(bool)", lambda _=None: self.onSet("pathology_present", "yes"))
        self.ui.presentNoButton.connect("clicked(bool)", lambda _=None: self.onSet("pathology_present", "no"))
        self.ui.confidenceSpinBox.connect("valueChanged(int)", lambda v: self.onSet("confidence", v or None, refresh=False))
        self.ui.commentTextEdit.connect("textChanged()", self.onComment)
        self.ui.backButton.connect("clicked(bool)", lambda _=None: self.onKey("B"))
        self.ui.saveNextButton.connect("clicked(bool)", lambda _=None: self.onKey("Return"))
        self.ui.nextButton.connect("clicked(bool)", self.onNext)
        self.ui.landmarkCheckBox.connect("toggled(bool)", self.onLandmark)
        self.ui.caseCollapsibleButton.enabled = False
        self.createShortcuts()

    def createShortcuts(self):
        """Single-key shortcuts owned by this panel, active only while it (or a child) has the keyboard focus:
        never application-wide, where they would take the slice views' keys. A hidden panel has no focus, so
        they are off while another module is shown."""
        from SpineInpaintLib.rating import SHORTCUT_CONTEXT, SHORTCUTS

        self.parent.setFocusPolicy(qt.Qt.StrongFocus)  # clicking the panel gives it the focus
        for key in SHORTCUTS:
            sc = qt.QShortcut(qt.QKeySequence(key), self.parent)
            sc.setContext(getattr(qt.Qt, SHORTCUT_CONTEXT))
            sc.connect("activated()", lambda k=key: self.onKey(k))
            self.shortcuts.append(sc)

    def cleanup(self):
        for sc in self.shortcuts:
            sc.setParent(None)
            sc.deleteLater()
        self.shortcuts = []
        self.removeObservers()

    # ------------------------------------------------------------------ actions
    def onOpen(self):
        from SpineInpaintLib.rating import RATING_LAYOUT_ID, ratingLayoutXml

        lm = slicer.app.layoutManager()
        layoutNode = lm.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(RATING_LAYOUT_ID):
            layoutNode.AddLayoutDescription(RATING_LAYOUT_ID, ratingLayoutXml())
        lm.setLayout(RATING_LAYOUT_ID)
        slicer.app.processEvents()
        try:
            location = self.ui.studyUrlLineEdit.text.strip() or self.ui.studyDirPathLineEdit.currentPath
            self.logic.rating.openStudy(location, self.ui.tokenLineEdit.text)
        except Exception as e:  # noqa: BLE001 - shown to the reader, one line
            self.ui.statusLabel.text = f"Could not open the study: {e}"
            return
        self.ui.tokenLineEdit.text = ""
        self.ui.caseCollapsibleButton.enabled = True
        notes = list(self.logic.rating.warnings)
        if self.logic.rating.isFinished():
            notes.append("All cases answered; you can review and change answers with Back / Next.")
        self.ui.statusLabel.text = " ".join(notes)
        self.refresh()
        self.parent.setFocus()  # the keys act right away

    def onSet(self, qid, value, refresh=True):
        if self.logic.rating.session:
            self.logic.rating.setValue(qid, value)
            if refresh:
                self.refresh(keepText=True)

    def onComment(self):
        if self.logic.rating.session:
            self.logic.rating.setValue("comment", self.ui.commentTextEdit.toPlainText() or None)

    def onKey(self, key):
        r = self.logic.rating
        if not r.session:
            return
        try:
            action = r.handleKey(key)
        except ValueError as e:  # missing required answers
            self.ui.statusLabel.text = str(e)
            return
        except Exception as e:  # noqa: BLE001
            self.ui.statusLabel.text = f"Not saved: {e}"
            return
        if action in ("save", "back"):
            self.ui.statusLabel.text = "All cases answered, thank you." if r.isFinished() else ""
        self.refresh(keepText=action == "set")

    def onNext(self):
        if self.logic.rating.next():
            self.refresh()

    def onLandmark(self, on):
        if self.logic.rating.session:
            self.logic.rating.setLandmarkVisible(on)

    def refresh(self, keepText=False):
        r = self.logic.rating
        if not r.session or not r.case:
            return
        self.ui.progressLabel.text = f"Case {r.progressText()}   ({r.session.answered()} answered)"
        self.ui.caseLabel.text = f"Level {r.case['level']}   ID {r.case['case_id']}"
        self.ui.pathologyLabel.text = r.questionText("pathology_present")
        v = r.values
        for button, qid, val in ((self.ui.realisticYesButton, "realistic", "yes"), (self.ui.realisticNoButton, "realistic", "no"),
                                 (self.ui.presentYesButton, "pathology_present", "yes"),
                                 (self.ui.presentNoButton, "pathology_present", "no")):
            button.checked = v.get(qid) == val
        wasBlocked = self.ui.confidenceSpinBox.blockSignals(True)
        self.ui.confidenceSpinBox.value = int(v.get("confidence") or 0)
        self.ui.confidenceSpinBox.blockSignals(wasBlocked)
        if not keepText:
            wasBlocked = self.ui.commentTextEdit.blockSignals(True)
            self.ui.commentTextEdit.setPlainText(v.get("comment", ""))
            self.ui.commentTextEdit.blockSignals(wasBlocked)
        self.ui.landmarkCheckBox.checked = r.showLandmark
        self._fitViews()

    def _fitViews(self):
        from SpineInpaintLib.rating import AXIAL_VIEW, SAGITTAL_VIEW

        lm = slicer.app.layoutManager()
        for name in (SAGITTAL_VIEW, AXIAL_VIEW):
            w = lm.sliceWidget(name)
            if w is not None:
                w.sliceLogic().FitSliceToAll()
                w.mrmlSliceNode().JumpSliceByCentering(*self.logic.rating.landmarkRas())


class SpineInpaintRatingLogic(ScriptedLoadableModuleLogic):
    """Holds one ``RatingLogic`` (see SpineInpaintLib/rating.py) for scripting: ``slicer.modules.spineinpaintrating``."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        from SpineInpaintLib.rating import RatingLogic

        self.rating = RatingLogic(slicer.mrmlScene)


class SpineInpaintRatingTest(ScriptedLoadableModuleTest):
    """In-Slicer smoke test: demo study, a reader's copy, answer two cases with the shortcut keys, resume.

    Registered with ctest (``slicer_add_python_unittest``); skipped with the reason on a Slicer without the backend's
    packages (the factory's build machines)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        problem = self._problem()
        if problem:  # "Reload and Test": say why instead of failing
            self.delayDisplay(f"SpineInpaintRatingTest skipped: {problem}")
            return
        self.setUp()
        self.test_rating_roundtrip()

    @staticmethod
    def _problem():
        from SpineInpaintLib.rating import _ensureBackendImportable

        _ensureBackendImportable()
        import importlib

        try:  # numpy, SimpleITK, and scipy for the demo study's phantom
            for name in ("spine_ldm.study.engine", "scipy.ndimage"):
                importlib.import_module(name)
        except ImportError as e:
            return f"the reader-study backend cannot be imported ({e}); press Apply once in SpineInpaint"
        return ""

    def test_rating_roundtrip(self):
        import tempfile

        problem = self._problem()
        if problem:
            self.skipTest(problem)
        from spine_ldm.errors import InputError
        from spine_ldm.study.engine import make_demo_study
        from SpineInpaintLib.rating import RatingLogic, makeReaderCopy

        d = tempfile.mkdtemp()
        study = make_demo_study(os.path.join(d, "study"), n_inpainted_per_method=1, n_real_pathological=1, n_real_healthy=1)
        _, token = study.add_reader("slicer-self-test")
        logic = RatingLogic(slicer.mrmlScene)
        with self.assertRaises(InputError):  # the organizer's folder holds the truth key
            logic.openStudy(str(study.root), token)
        copy = makeReaderCopy(str(study.root), "slicer-self-test", os.path.join(d, "copy"))
        logic.openStudy(copy, token)
        for key in ("Y", "P", "Return", "N", "A", "Return"):
            logic.handleKey(key)
        again = RatingLogic(slicer.mrmlScene)
        self.assertEqual(again.openStudy(copy, token)["resume_index"], 2)
        self.delayDisplay("SpineInpaintRating self-test passed")
